"""The demo dataset: MVTec AD layout, masks that mark the defects, determinism."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_apc.data import SupervisedMVTecAD, make_demo_dataset
from anomalib_apc.data.demo import DEFECT_TYPES


def fingerprint(category_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(category_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(category_dir.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def demo_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset with its default settings."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"))


def test_layout_and_counts(demo_category: Path) -> None:
    assert demo_category.name == "demo"
    assert len(list((demo_category / "train" / "good").glob("*.png"))) == 30
    assert len(list((demo_category / "test" / "good").glob("*.png"))) == 20
    assert len(DEFECT_TYPES) >= 3
    for defect_type in DEFECT_TYPES:
        images = sorted((demo_category / "test" / defect_type).glob("*.png"))
        masks = sorted((demo_category / "ground_truth" / defect_type).glob("*.png"))
        assert len(images) == 20
        assert [f"{image.stem}_mask.png" for image in images] == [mask.name for mask in masks]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_benchmark_split_leaves_sixty_test_images_with_fifteen_of_each_defect_type(
    demo_category: Path, seed: int
) -> None:
    """The demo's test set is large enough to judge: the 10 anomalies moved to APC's training leave the rest."""
    datamodule = SupervisedMVTecAD(root=demo_category.parent, category=demo_category.name, num_anomalies=10, seed=seed)
    datamodule.setup()
    samples = datamodule.test_data.samples
    assert len(samples) >= 60
    labelled = zip(samples.image_path, samples.label_index, strict=True)
    defects = Counter(Path(path).parent.name for path, label in labelled if label)
    assert set(defects) == set(DEFECT_TYPES) and min(defects.values()) >= 15


def test_images_are_rgb_and_structured_and_masks_mark_visible_defects(demo_category: Path) -> None:
    normal = np.asarray(Image.open(demo_category / "train" / "good" / "000.png"), dtype=float)
    assert normal.shape == (128, 128, 3)
    assert normal.std() > 20, "normal images should show a part on a texture, not a flat colour"
    for defect_type in DEFECT_TYPES:
        image = np.asarray(Image.open(demo_category / "test" / defect_type / "000.png"), dtype=float)
        mask = np.asarray(Image.open(demo_category / "ground_truth" / defect_type / "000_mask.png"))
        assert mask.shape == image.shape[:2]
        assert set(np.unique(mask)) == {0, 255}
        inside, outside = image[mask > 0].mean(axis=0), image[mask == 0].mean(axis=0)
        assert np.abs(inside - outside).max() > 20, f"{defect_type} defect should stand out from the rest"


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    arguments = {"image_size": 32, "num_train": 2, "num_test_normal": 1, "num_per_defect_type": 1}
    first = fingerprint(make_demo_dataset(tmp_path / "a", seed=5, **arguments))
    assert fingerprint(make_demo_dataset(tmp_path / "b", seed=5, **arguments)) == first
    other = fingerprint(make_demo_dataset(tmp_path / "c", seed=6, **arguments))
    assert other.keys() == first.keys() and other != first


def test_rerun_is_harmless_but_foreign_images_are_refused(tmp_path: Path) -> None:
    arguments = {"category": "parts", "image_size": 32, "num_train": 2, "num_test_normal": 1, "num_per_defect_type": 1}
    category_dir = make_demo_dataset(tmp_path, **arguments)
    assert category_dir == tmp_path / "parts"
    make_demo_dataset(tmp_path, **arguments)
    Image.new("RGB", (32, 32)).save(category_dir / "train" / "good" / "stranger.png")
    with pytest.raises(FileExistsError, match=r"stranger\.png"):
        make_demo_dataset(tmp_path, **arguments)
