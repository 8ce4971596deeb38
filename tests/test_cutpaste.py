"""CutPaste: the mask is exactly the pasted region, samples are seeded, and training uses it."""

import pytest
import torch
from PIL import Image

from anomalib_apc.data import CutPaste, SupervisedMVTecAD
from anomalib_apc.data.cutpaste_grid import save_cutpaste_grid
from anomalib_apc.errors import InvalidInputError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


Box = tuple[slice, slice]


def defect(size: int = 48, box: Box = (slice(5, 20), slice(30, 36))) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[box] = True
    mask[box[0].start, box[1].start] = False  # not a plain rectangle
    return image, mask


def cut_and_paste(normal: torch.Tensor, seed: int, **defect_arguments) -> tuple[torch.Tensor, torch.Tensor]:
    defect_image, defect_mask = defect(**defect_arguments)
    device = normal.device
    return CutPaste()(normal, defect_image.to(device), defect_mask.to(device), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_mask_marks_exactly_the_pasted_pixels(device, seed) -> None:
    # A normal image of NaN: every pixel that is a number afterwards was pasted.
    normal = torch.full((3, 64, 64), float("nan"), device=device)
    image, mask = cut_and_paste(normal, seed)
    pasted = ~torch.isnan(image)
    assert mask.device == image.device == normal.device
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert mask.any()
    assert torch.equal(pasted, mask.expand_as(pasted))


def test_patch_larger_than_the_normal_image_is_cut_to_fit() -> None:
    normal = torch.full((3, 16, 16), float("nan"))
    image, mask = cut_and_paste(normal, seed=0, box=(slice(0, 40), slice(0, 40)))
    assert mask.shape == (16, 16)
    assert torch.equal(~torch.isnan(image), mask.expand(3, -1, -1))


def test_same_generator_seed_gives_the_same_sample_and_leaves_global_randomness_alone() -> None:
    normal = torch.rand(3, 64, 64)
    global_state = torch.get_rng_state()
    first, second, other = (cut_and_paste(normal, seed) for seed in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def pasted_values(cutpaste: CutPaste, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pasted pixels of one sample, per channel and sorted, with the defect pixels they came from."""
    defect_image, defect_mask = defect()
    normal = torch.full((3, 64, 64), float("nan"))
    image, mask = cutpaste(normal, defect_image, defect_mask, torch.Generator().manual_seed(seed))
    return image[:, mask].sort(dim=1).values, defect_image[:, defect_mask].sort(dim=1).values


def test_without_jitter_or_rotation_the_pasted_pixels_are_the_defect_pixels() -> None:
    pasted, original = pasted_values(CutPaste(brightness=0.0, saturation=0.0, rotation_degrees=0.0), seed=0)
    assert torch.allclose(pasted, original, atol=1e-5)


def test_pasted_patch_is_jittered_and_rotated() -> None:
    pasted, original = pasted_values(CutPaste(rotation_degrees=0.0), seed=0)
    assert pasted.shape == original.shape and not torch.allclose(pasted, original, atol=1e-3)
    normal = torch.zeros(3, 64, 64)
    heights = {int(cut_and_paste(normal, seed)[1].any(dim=1).sum()) for seed in range(8)}
    assert len(heights) > 1, "the patch should be turned by varying angles"


@pytest.mark.parametrize(
    ("mask", "message"),
    [(torch.zeros(48, 48, dtype=torch.bool), "empty"), (torch.ones(40, 48, dtype=torch.bool), "does not match")],
)
def test_unusable_defect_masks_are_errors(mask, message) -> None:
    with pytest.raises(ValueError, match=message):
        CutPaste()(torch.rand(3, 64, 64), torch.rand(3, 48, 48), mask, torch.Generator().manual_seed(0))


def test_training_replaces_anomalous_draws_by_cutpaste_samples(tiny_dataset) -> None:
    datamodule = SupervisedMVTecAD(
        root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=6, cutpaste_probability=1.0,
        basic_augmentations=False, num_workers=0,
    )
    datamodule.setup()
    train_dataset = datamodule.train_dataloader().dataset
    anomalous_index = int(train_dataset.is_anomalous.nonzero()[0][0])
    real_anomalies = set(datamodule.supervised_anomaly_paths)
    for sample_seed in range(5):
        item = train_dataset[anomalous_index, sample_seed]
        normal_index = train_dataset.dataset.samples.image_path.tolist().index(item.image_path)
        normal_image = train_dataset.dataset[normal_index].image
        changed = (item.image != normal_image).any(dim=0)
        assert item.gt_label and item.image_path not in real_anomalies
        assert item.gt_mask.any()
        assert not (changed & ~item.gt_mask).any(), "pixels changed outside the mask"
        assert changed.sum() >= 0.9 * item.gt_mask.sum()
    assert torch.equal(train_dataset[anomalous_index, 3].image, train_dataset[anomalous_index, 3].image)


def test_grid_picture_is_written(tiny_dataset, tmp_path) -> None:
    output = save_cutpaste_grid(tiny_dataset.root, tiny_dataset.category, tmp_path / "grid.png", rows=2, columns=2)
    with Image.open(output) as picture:
        assert picture.size[0] > 100 and picture.size[1] > 100


@pytest.mark.parametrize(("arguments", "message"), [({"num_anomalies": 0}, "num_anomalies"), ({"rows": 0}, "rows")])
def test_grid_without_anomalies_or_cells_is_an_error_not_an_endless_loop(tiny_dataset, tmp_path, arguments, message):
    with pytest.raises(InvalidInputError, match=message):
        save_cutpaste_grid(tiny_dataset.root, tiny_dataset.category, tmp_path / "grid.png", **arguments)
    assert not (tmp_path / "grid.png").exists()
