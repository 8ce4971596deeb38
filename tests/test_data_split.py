"""The supervised split: which anomalies move to training, what batches hold, and bad input."""

import inspect
import json
import logging
from collections import Counter
from dataclasses import fields
from pathlib import Path

import docstring_parser
import pytest
from anomalib.data import AnomalibDataModule, MVTecAD
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from PIL import Image

from anomalib_apc.data import SPLIT_FILE_NAME, SupervisedFolder, SupervisedMVTecAD, select_anomalies
from anomalib_apc.data.sampler import TrainDrawSampler
from anomalib_apc.data.split import defect_type_of
from anomalib_apc.data.split_arguments import SHARED_ARGUMENTS_MARKER, SPLIT_DEFAULTS, SplitArguments
from anomalib_apc.errors import InvalidInputError, MissingInputError


def make_datamodule(dataset, **overrides) -> SupervisedMVTecAD:
    arguments = {"root": dataset.root, "category": dataset.category, "num_anomalies": 7, "num_workers": 0}
    return SupervisedMVTecAD(**(arguments | overrides))


def set_up(dataset, **overrides) -> SupervisedMVTecAD:
    datamodule = make_datamodule(dataset, **overrides)
    datamodule.setup()
    return datamodule


def image_paths(subset) -> set[str]:
    return set(subset.samples.image_path)


# The choice of anomalies.


def test_select_anomalies_goes_round_robin_and_skips_types_that_run_out() -> None:
    paths = {"big": [f"big/{i}" for i in range(5)], "single": ["single/0"], "mid": [f"mid/{i}" for i in range(3)]}
    chosen = select_anomalies(paths, num_anomalies=7, seed=0)
    assert len(set(chosen)) == 7
    assert Counter(path.split("/")[0] for path in chosen) == {"big": 3, "single": 1, "mid": 3}


def test_select_anomalies_is_reproducible_and_depends_on_the_seed() -> None:
    paths = {kind: [f"{kind}/{i:02d}" for i in range(20)] for kind in ("a", "b", "c")}
    assert select_anomalies(paths, 10, seed=3) == select_anomalies(paths, 10, seed=3)
    assert select_anomalies(paths, 10, seed=3) != select_anomalies(paths, 10, seed=4)


def test_split_moves_anomalies_from_test_to_train_and_keeps_them_disjoint(tiny_dataset) -> None:
    datamodule = set_up(tiny_dataset)
    moved = datamodule.supervised_anomaly_paths
    train, test = datamodule.train_data.samples, datamodule.test_data.samples

    assert not image_paths(datamodule.train_data) & image_paths(datamodule.test_data)
    assert not image_paths(datamodule.train_data) & image_paths(datamodule.val_data)
    assert set(train[train.label_index == 1].image_path) == set(moved)
    assert (train.label_index == 0).sum() == tiny_dataset.train_normal
    assert (test.label_index == 0).sum() == tiny_dataset.test_normal
    assert (test.label_index == 1).sum() == tiny_dataset.test_anomalous - 7
    assert all(train[train.label_index == 1].mask_path.map(lambda path: Path(path).is_file()))


def test_split_spreads_anomalies_evenly_over_defect_types(tiny_dataset) -> None:
    counts = Counter(map(defect_type_of, set_up(tiny_dataset).supervised_anomaly_paths))
    assert set(counts) == set(tiny_dataset.defect_types)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_same_seed_gives_the_same_split_and_another_seed_another(tiny_dataset) -> None:
    first = set_up(tiny_dataset, seed=1).supervised_anomaly_paths
    assert set_up(tiny_dataset, seed=1).supervised_anomaly_paths == first
    assert set_up(tiny_dataset, seed=2).supervised_anomaly_paths != first


def test_supervised_folder_uses_the_same_split(tiny_dataset) -> None:
    datamodule = SupervisedFolder(
        name="tiny_folder",
        root=tiny_dataset.category_dir,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=[f"test/{kind}" for kind in tiny_dataset.defect_types],
        mask_dir=[f"ground_truth/{kind}" for kind in tiny_dataset.defect_types],
        num_anomalies=6,
        val_split_mode="same_as_test",
        num_workers=0,
    )
    datamodule.setup()
    assert Counter(map(defect_type_of, datamodule.supervised_anomaly_paths)) == {"scratch": 2, "stain": 2, "hole": 2}
    assert not image_paths(datamodule.train_data) & image_paths(datamodule.test_data)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask.shape == batch.image.shape[:1] + batch.image.shape[2:]


# What training sees.


def test_train_batches_carry_image_label_and_mask(tiny_dataset) -> None:
    datamodule = set_up(tiny_dataset, train_batch_size=40, cutpaste_probability=0.0)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask.shape == (len(batch.image), *batch.image.shape[-2:])
    assert batch.gt_label.any() and not batch.gt_label.all()
    assert not batch.gt_mask[~batch.gt_label].any()
    assert all(mask.any() for mask in batch.gt_mask[batch.gt_label])


def test_balanced_sampler_draws_normal_and_anomalous_equally_often() -> None:
    labels = [0] * 54 + [1] * 10
    sampler = TrainDrawSampler(labels, balanced=True, seed=0)
    drawn = [labels[index] for _ in range(200) for index, _ in sampler]
    assert abs(sum(drawn) / len(drawn) - 0.5) < 0.02


def test_unbalanced_sampler_is_a_permutation_per_epoch() -> None:
    sampler = TrainDrawSampler([0] * 54 + [1] * 10, balanced=False, seed=0)
    first, second = [index for index, _ in sampler], [index for index, _ in sampler]
    assert sorted(first) == sorted(second) == list(range(64))
    assert first != second


def test_sampler_epochs_are_reproducible_from_the_seed() -> None:
    def two_epochs(seed: int) -> list[list[tuple[int, int]]]:
        sampler = TrainDrawSampler([0] * 20 + [1] * 4, balanced=True, seed=seed)
        return [list(sampler), list(sampler)]

    assert two_epochs(0) == two_epochs(0)
    assert two_epochs(0) != two_epochs(1)


def test_balanced_sampling_can_be_switched_off(tiny_dataset) -> None:
    datamodule = set_up(tiny_dataset, balanced_sampling=False)
    assert not datamodule.train_dataloader().sampler.balanced


def test_normal_train_dataloader_serves_real_normal_images_in_a_fixed_order(tiny_dataset) -> None:
    datamodule = set_up(tiny_dataset, cutpaste_probability=1.0, eval_batch_size=5)

    def served_paths() -> list[str]:
        paths = []
        for batch in datamodule.normal_train_dataloader():
            assert not batch.gt_label.any() and not batch.gt_mask.any()
            paths += batch.image_path
        return paths

    paths = served_paths()
    assert paths == served_paths() == sorted(paths)
    assert set(paths) == set(datamodule.train_data.samples.query("label_index == 0").image_path)
    assert not set(paths) & set(datamodule.supervised_anomaly_paths)


def test_zero_anomalies_behaves_like_the_one_class_datamodule(tiny_dataset, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="anomalib_apc.data"):
        datamodule = set_up(tiny_dataset, num_anomalies=0)
    plain = MVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_workers=0)
    plain.setup()

    assert "num_anomalies=0" in caplog.text
    assert datamodule.supervised_anomaly_paths == []
    for ours, anomalibs in ((datamodule.train_data, plain.train_data), (datamodule.test_data, plain.test_data)):
        assert ours.samples[anomalibs.samples.columns].equals(anomalibs.samples)  # plus the annotation columns
    assert type(datamodule.train_dataloader().sampler) is type(plain.train_dataloader().sampler)


# Recording the split.


def test_split_file_is_written_to_the_trainer_root_and_on_request(tiny_dataset, tmp_path) -> None:
    datamodule = make_datamodule(tiny_dataset)
    datamodule.trainer = Trainer(default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False)
    datamodule.setup("fit")
    record = json.loads((tmp_path / "run" / SPLIT_FILE_NAME).read_text())

    moved = [Path(path).resolve() for path in datamodule.supervised_anomaly_paths]
    assert [Path(entry["image_path"]) for entry in record["train_anomalies"]] == moved
    assert {entry["defect_type"] for entry in record["train_anomalies"]} == set(tiny_dataset.defect_types)
    assert record["counts"]["train"] == {"normal": tiny_dataset.train_normal, "anomalous": 7}
    assert set(record["test_image_paths"]) == {str(Path(path).resolve()) for path in image_paths(datamodule.test_data)}
    assert json.loads(datamodule.save_split(tmp_path / "elsewhere").read_text()) == record


def test_cli_parser_reaches_every_knob_by_short_class_name(tiny_dataset) -> None:
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    arguments = ["--data", "SupervisedMVTecAD", f"--data.root={tiny_dataset.root}", "--data.category=tiny"]
    arguments += ["--data.num_anomalies=4", "--data.balanced_sampling=false", "--data.cutpaste_probability=0.25"]
    arguments += ["--data.cutpaste_rotation_degrees=45", "--data.seed=7", "--data.basic_augmentations=false"]
    datamodule = parser.instantiate_classes(parser.parse_args(arguments)).data
    assert isinstance(datamodule, SupervisedMVTecAD)
    assert (datamodule.num_anomalies, datamodule.balanced_sampling, datamodule.cutpaste_probability) == (4, False, 0.25)
    assert not datamodule.basic_augmentations
    assert datamodule.seed == 7


@pytest.mark.parametrize("datamodule", [SupervisedFolder, SupervisedMVTecAD])
def test_both_datamodules_show_the_split_arguments_declared_once(datamodule: type) -> None:
    """anomalib's CLI reads each signature and docstring: every split argument is there, default and help."""
    parameters = inspect.signature(datamodule).parameters
    documented = {param.arg_name: param.description for param in docstring_parser.parse(datamodule.__doc__).params}
    for split_field in fields(SplitArguments):
        assert parameters[split_field.name].default == getattr(SPLIT_DEFAULTS, split_field.name), split_field.name
        assert documented[split_field.name], split_field.name
    assert documented["cutpaste_brightness"] == "Brightness jitter of pasted defects."
    assert SHARED_ARGUMENTS_MARKER not in datamodule.__doc__


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [("num_anomalies", -1, "num_anomalies must be 0 or more, got -1"),
     ("cutpaste_probability", 1.5, r"cutpaste_probability must lie in \[0, 1\], got 1.5"),
     ("training_annotation", "boxes", "training_annotation must be one of")],
)
def test_a_bad_split_argument_is_named_when_the_datamodule_is_built(
    tmp_path: Path, argument: str, value: object, message: str
) -> None:
    """Before anything is read: the root does not even exist."""
    with pytest.raises(InvalidInputError, match=message):
        SupervisedMVTecAD(root=tmp_path / "absent", category="tiny", **{argument: value})
    with pytest.raises(InvalidInputError, match=message):
        SupervisedFolder(name="x", normal_dir=tmp_path / "absent", **{argument: value})


# Bad input.


def test_more_anomalies_than_available_is_an_error(tiny_dataset) -> None:
    with pytest.raises(ValueError, match="num_anomalies=16 would take all 15 anomalous images"):
        set_up(tiny_dataset, num_anomalies=16)


def test_all_anomalies_is_an_error_as_more_is(tiny_dataset) -> None:
    with pytest.raises(ValueError, match=r"num_anomalies=15 would take all 15 anomalous images .* test set none"):
        set_up(tiny_dataset, num_anomalies=tiny_dataset.test_anomalous)
    assert set_up(tiny_dataset, num_anomalies=tiny_dataset.test_anomalous - 1).test_data.has_anomalous


def test_missing_category_folder_is_named_instead_of_downloading(tmp_path: Path) -> None:
    datamodule = SupervisedMVTecAD(root=tmp_path / "mpdd", category="metal_plate", num_workers=0)
    with pytest.raises(MissingInputError, match=r"no folder .*mpdd/metal_plate and 'metal_plate' is not an MVTec AD"):
        datamodule.prepare_data()
    assert not (tmp_path / "mpdd").exists()


def test_category_without_anomalies_is_an_error(tiny_dataset_copy) -> None:
    for kind in tiny_dataset_copy.defect_types:
        for folder in ("test", "ground_truth"):
            for path in (tiny_dataset_copy.category_dir / folder / kind).iterdir():
                path.unlink()
    with pytest.raises(InvalidInputError, match="has no anomalous test images"):
        set_up(tiny_dataset_copy)


def test_anomalous_image_without_mask_is_named(tiny_dataset_copy) -> None:
    (tiny_dataset_copy.category_dir / "ground_truth" / "stain" / "002_mask.png").unlink()
    with pytest.raises(MissingInputError, match=r"test/stain/002\.png has no mask"):
        set_up(tiny_dataset_copy)


def test_mask_without_anomalous_image_is_named(tiny_dataset_copy) -> None:
    stray = tiny_dataset_copy.category_dir / "ground_truth" / "hole" / "042_mask.png"
    Image.new("L", (64, 64)).save(stray)
    with pytest.raises(MissingInputError, match=r"mask .*hole/042_mask\.png has no anomalous image"):
        set_up(tiny_dataset_copy)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image_is_named(tiny_dataset_copy, content) -> None:
    broken = tiny_dataset_copy.category_dir / "train" / "good" / "003.png"
    broken.write_bytes(broken.read_bytes()[:200] if content == "truncated" else content)
    with pytest.raises(InvalidInputError, match=r"cannot read image .*train/good/003\.png"):
        set_up(tiny_dataset_copy)


def test_mask_of_another_size_is_named(tiny_dataset_copy) -> None:
    mask = tiny_dataset_copy.category_dir / "ground_truth" / "hole" / "001_mask.png"
    Image.new("L", (32, 48)).save(mask)
    expected = r"mask .*hole/001_mask\.png is 32x48 px but its image .*hole/001\.png is 64x64"
    with pytest.raises(ValueError, match=expected):
        set_up(tiny_dataset_copy)


def test_training_anomaly_with_empty_mask_is_explained_and_never_cut(tiny_dataset_copy, caplog) -> None:
    for path in (tiny_dataset_copy.category_dir / "ground_truth" / "scratch").iterdir():
        Image.new("L", (64, 64)).save(path)
    datamodule = set_up(tiny_dataset_copy)
    with caplog.at_level(logging.WARNING, logger="anomalib_apc.data"):
        sources = datamodule.train_dataloader().dataset.cutpaste_source_indices
    assert "empty mask" in caplog.text
    source_paths = datamodule.train_data.samples.image_path.iloc[sources]
    assert len(sources) > 0
    assert "scratch" not in set(source_paths.map(defect_type_of))


@pytest.mark.parametrize(("argument", "value"), [("num_anomalies", -1), ("cutpaste_probability", 1.5)])
def test_out_of_range_arguments_are_errors(tiny_dataset, argument, value) -> None:
    with pytest.raises(ValueError, match=argument):
        make_datamodule(tiny_dataset, **{argument: value})


# The real data.


def test_mpdd_metal_plate_split(mpdd_root) -> None:
    datamodule = SupervisedMVTecAD(root=mpdd_root, category="metal_plate", num_anomalies=10, seed=0, num_workers=0)
    datamodule.setup()
    counts = datamodule.split_counts()
    assert counts["train"] == {"normal": 54, "anomalous": 10}
    assert counts["test"] == {"normal": 26, "anomalous": 71}
    assert {defect_type_of(path) for path in datamodule.supervised_anomaly_paths} == {"defect"}
    assert not image_paths(datamodule.train_data) & image_paths(datamodule.test_data)
