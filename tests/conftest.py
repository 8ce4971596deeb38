"""Shared pytest fixtures.

Data fixtures: a tiny generated dataset in MVTec AD layout (64 px, made once per session) and the
location of the real MPDD ``metal_plate`` data, which tests skip without.
"""

import dataclasses
import shutil
from pathlib import Path

import pytest

MPDD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mpdd"


@dataclasses.dataclass(frozen=True)
class TinyDataset:
    """Where the tiny dataset lies and what it holds."""

    root: Path
    category: str = "tiny"
    train_normal: int = 12
    test_normal: int = 4
    per_defect_type: int = 5
    defect_types: tuple[str, ...] = ("scratch", "stain", "hole")

    @property
    def category_dir(self) -> Path:
        return self.root / self.category

    @property
    def test_anomalous(self) -> int:
        return self.per_defect_type * len(self.defect_types)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    """A tiny demo dataset shared by the whole session; do not modify its files."""
    from anomalib_apc.data import make_demo_dataset

    dataset = TinyDataset(root=tmp_path_factory.mktemp("tiny_dataset"))
    make_demo_dataset(
        dataset.root,
        seed=0,
        category=dataset.category,
        image_size=64,
        num_train=dataset.train_normal,
        num_test_normal=dataset.test_normal,
        num_per_defect_type=dataset.per_defect_type,
    )
    return dataset


@pytest.fixture
def tiny_dataset_copy(tiny_dataset: TinyDataset, tmp_path: Path) -> TinyDataset:
    """A private copy of the tiny dataset, for tests that break files on purpose."""
    root = Path(shutil.copytree(tiny_dataset.root, tmp_path / "tiny_dataset"))
    return dataclasses.replace(tiny_dataset, root=root)


@pytest.fixture(scope="session")
def mpdd_root() -> Path:
    """Root of the real MPDD data (``../shared/datasets/mpdd`` from the repository); skips when absent."""
    if not (MPDD_ROOT / "metal_plate").is_dir():
        pytest.skip(f"MPDD metal_plate is not at {MPDD_ROOT} (../shared/datasets/mpdd next to the repository)")
    return MPDD_ROOT
