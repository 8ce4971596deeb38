"""The paper's basic augmentations: image and mask alike, seeded per sample, training draws only."""

import pytest
import torch

from anomalib_apc.data import SupervisedFolder, SupervisedMVTecAD
from anomalib_apc.data.basic_augmentation import BasicAugmentation


def bright_square() -> tuple[torch.Tensor, torch.Tensor]:
    """A dark textured image with a bright, asymmetric blob; its mask is the blob's bright pixels."""
    image = 0.1 + 0.05 * torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    image[:, 10:30, 20:28] = 0.9
    image[:, 10:14, 28:44] = 0.9  # an L shape: any flip or turn shows
    return image, image[0] > 0.5


@pytest.mark.parametrize("seed", range(8))
def test_mask_moves_with_the_image(seed: int) -> None:
    image, mask = bright_square()
    augmented, augmented_mask = BasicAugmentation()(image, mask, torch.Generator().manual_seed(seed))
    assert augmented.shape == image.shape and augmented_mask.shape == mask.shape
    assert augmented_mask.dtype == torch.bool
    bright = augmented.mean(dim=0) > 0.5
    disagreement = (bright != augmented_mask).float().sum() / augmented_mask.sum()
    assert disagreement < 0.1  # only edge pixels, which the image interpolates and the mask does not
    assert not torch.equal(augmented_mask, mask)


def test_each_part_of_the_augmentation_changes_the_image() -> None:
    image, mask = bright_square()
    seeds = range(8)
    off = {"flip_probability": 0.0, "rotation_degrees": 0.0, "translation": 0.0, "scale": (1.0, 1.0),
           "brightness": 0.0, "contrast": 0.0, "saturation": 0.0}
    identity = BasicAugmentation(**off)
    for seed in seeds:
        unchanged, unchanged_mask = identity(image, mask, torch.Generator().manual_seed(seed))
        assert torch.allclose(unchanged, image, atol=1e-5) and torch.equal(unchanged_mask, mask)
    for part in ({"flip_probability": 0.5}, {"rotation_degrees": 10.0}, {"brightness": 0.1}):
        augmentation = BasicAugmentation(**(off | part))
        changed = [augmentation(image, mask, torch.Generator().manual_seed(seed))[0] for seed in seeds]
        assert any(not torch.allclose(result, image, atol=1e-3) for result in changed), part


def test_same_seed_same_result_and_the_global_random_state_is_left_alone() -> None:
    image, mask = bright_square()
    state = torch.get_rng_state()
    first, second, other = (BasicAugmentation()(image, mask, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def datamodule(tiny_dataset, **overrides) -> SupervisedMVTecAD:
    arguments = {"root": tiny_dataset.root, "category": tiny_dataset.category, "num_anomalies": 6,
                 "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0, "seed": 0}
    module = SupervisedMVTecAD(**(arguments | overrides))
    module.setup()
    return module


def unaugmented(module: SupervisedMVTecAD, paths: list[str]) -> torch.Tensor:
    """The training images of ``paths`` as read from their files, without any augmentation."""
    all_paths = module.train_data.samples.image_path.tolist()
    return torch.stack([module.train_data[all_paths.index(path)].image for path in paths])


def test_training_batches_are_augmented_reproducibly_and_differently_per_epoch(tiny_dataset) -> None:
    module = datamodule(tiny_dataset, cutpaste_probability=0.0)
    loader = module.train_dataloader()
    first_epoch, second_epoch = next(iter(loader)), next(iter(loader))
    again = next(iter(datamodule(tiny_dataset, cutpaste_probability=0.0).train_dataloader()))
    assert torch.equal(first_epoch.image, again.image) and torch.equal(first_epoch.gt_mask, again.gt_mask)
    assert not torch.equal(first_epoch.image, second_epoch.image)
    real = unaugmented(module, first_epoch.image_path)
    pairs = zip(first_epoch.image, real, strict=True)
    changed = [not torch.allclose(augmented, image, atol=1e-3) for augmented, image in pairs]
    assert all(changed), "every training draw, normal and anomalous, is augmented"
    assert first_epoch.gt_label.any() and not first_epoch.gt_label.all()


def test_anomalous_masks_follow_their_augmented_defect(tiny_dataset) -> None:
    module = datamodule(tiny_dataset, cutpaste_probability=0.0, train_batch_size=24)
    batch = next(iter(module.train_dataloader()))
    real_masks = [module.train_data[module.train_data.samples.image_path.tolist().index(path)].gt_mask
                  for path in batch.image_path]
    for mask, real_mask, label in zip(batch.gt_mask, real_masks, batch.gt_label, strict=True):
        if label:
            # Zoom and nearest-neighbour resampling change a thin defect's pixel count, never by half.
            assert 0.5 * int(real_mask.sum()) <= int(mask.sum()) <= 2 * int(real_mask.sum())
        else:
            assert not mask.any()


def test_switched_off_the_batches_are_the_images_as_read(tiny_dataset) -> None:
    module = datamodule(tiny_dataset, cutpaste_probability=0.0, basic_augmentations=False)
    batch = next(iter(module.train_dataloader()))
    assert torch.equal(batch.image, unaugmented(module, batch.image_path))


def test_cutpaste_samples_are_augmented_after_pasting(tiny_dataset) -> None:
    on = datamodule(tiny_dataset, cutpaste_probability=1.0).train_dataloader().dataset
    off = datamodule(tiny_dataset, cutpaste_probability=1.0, basic_augmentations=False).train_dataloader().dataset
    anomalous_index = int(on.is_anomalous.nonzero()[0][0])
    for sample_seed in range(3):
        augmented = on[anomalous_index, sample_seed]
        # The sample's own draws, replayed: the CutPaste decision, the CutPaste sample, then the augmentation.
        generator = torch.Generator().manual_seed(sample_seed)
        torch.rand((), generator=generator)
        pasted = off._cutpaste_item(generator)
        expected_image, expected_mask = BasicAugmentation()(pasted.image, pasted.gt_mask, generator)
        assert torch.equal(off[anomalous_index, sample_seed].image, pasted.image)  # same CutPaste either way
        assert torch.equal(augmented.image, expected_image) and torch.equal(augmented.gt_mask, expected_mask)
        assert not torch.allclose(augmented.image, pasted.image, atol=1e-3)
        assert augmented.gt_mask.any()


def test_memory_bank_images_are_never_augmented(tiny_dataset) -> None:
    module = datamodule(tiny_dataset, cutpaste_probability=1.0)
    for batch in module.normal_train_dataloader():
        assert torch.equal(batch.image, unaugmented(module, batch.image_path))


def test_validation_and_test_images_are_never_augmented(tiny_dataset) -> None:
    module = datamodule(tiny_dataset)
    paths = module.test_data.samples.image_path.tolist()
    batch = next(iter(module.test_dataloader()))
    as_read = torch.stack([module.test_data[paths.index(path)].image for path in batch.image_path])
    assert torch.equal(batch.image, as_read)


def test_supervised_folder_takes_the_switch(tiny_dataset) -> None:
    arguments = {
        "name": "tiny_folder", "root": tiny_dataset.category_dir, "normal_dir": "train/good",
        "normal_test_dir": "test/good", "abnormal_dir": [f"test/{kind}" for kind in tiny_dataset.defect_types],
        "mask_dir": [f"ground_truth/{kind}" for kind in tiny_dataset.defect_types], "num_anomalies": 6,
        "val_split_mode": "same_as_test", "num_workers": 0, "cutpaste_probability": 0.0,
    }
    batches = {}
    for switch in (True, False):
        module = SupervisedFolder(**arguments, basic_augmentations=switch)
        module.setup()
        assert (module.train_dataloader().dataset.augmentation is None) is not switch
        batches[switch] = next(iter(module.train_dataloader()))
    assert torch.equal(batches[True].gt_label, batches[False].gt_label)
    assert not torch.equal(batches[True].image, batches[False].image)
