"""The files behind the datamodules: how images are read, which files count, masks paired by name, bad files named."""

import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image as anomalib_read_image
from pandas import DataFrame
from PIL import Image

from anomalib_apc.data import SupervisedFolder, SupervisedMVTecAD, read_image
from anomalib_apc.data.validation import PROGRESS_BAR_MIN_FILES, check_image_files
from anomalib_apc.deploy.images import read_image_file as bundle_read_image
from anomalib_apc.errors import InvalidInputError, MissingInputError


def set_up(dataset, **overrides) -> SupervisedMVTecAD:
    arguments = {"root": dataset.root, "category": dataset.category, "num_anomalies": 3, "num_workers": 0}
    datamodule = SupervisedMVTecAD(**(arguments | overrides))
    datamodule.setup()
    return datamodule


def served_images(datamodule) -> dict[str, torch.Tensor]:
    return {
        path: image
        for batch in datamodule.normal_train_dataloader()
        for path, image in zip(batch.image_path, batch.image, strict=True)
    }


def anomalous_samples(datamodule):
    for name in ("train", "val", "test"):
        samples = getattr(datamodule, f"{name}_data").samples
        yield from samples[samples.label_index == 1].itertuples()


# 16-bit images.


def test_16_bit_grayscale_image_trains_as_its_8_bit_equivalent_not_as_white(tiny_dataset_copy) -> None:
    good = tiny_dataset_copy.category_dir / "train" / "good"
    gray = np.asarray(Image.open(good / "000.png").convert("L"))
    Image.fromarray(gray).save(good / "000.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(good / "100.png")  # the same values, 16 bits deep
    assert Image.open(good / "100.png").mode == "I;16"
    assert anomalib_read_image(good / "100.png", as_tensor=True).min() == 1.0, "anomalib's reader clips it"

    images = served_images(set_up(tiny_dataset_copy))
    sixteen, eight = images[str(good / "100.png")], images[str(good / "000.png")]
    assert not torch.all(sixteen == 1.0)
    assert sixteen.shape == eight.shape == (3, 64, 64)
    assert (sixteen - eight).abs().max() <= 1 / 255


@pytest.mark.parametrize(("dtype", "suffix"), [(np.uint16, ".png"), (np.int32, ".tif")])
def test_high_bit_depth_image_reads_exactly_as_the_bundle_reads_it(tmp_path, dtype, suffix) -> None:
    values = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(dtype)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    expected = torch.from_numpy(values.astype(np.float32) / 65535).expand(3, -1, -1)
    assert torch.equal(read_image(path), bundle_read_image(path))
    assert torch.allclose(read_image(path), expected)


def test_8_bit_images_read_exactly_as_anomalib_reads_them(tiny_dataset) -> None:
    path = tiny_dataset.category_dir / "test" / "hole" / "000.png"
    assert torch.equal(read_image(path), anomalib_read_image(path, as_tensor=True))


# Every image suffix, in MVTec AD layout.


def convert(path: Path, suffix: str) -> Path:
    converted = path.with_suffix(suffix)
    Image.open(path).convert("RGB" if path.parent.parent.name != "ground_truth" else "L").save(converted)
    path.unlink()
    return converted


def test_mvtec_layout_reads_every_image_suffix_and_pairs_their_masks(tiny_dataset_copy, caplog) -> None:
    category = tiny_dataset_copy.category_dir
    suffixes = [".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG"]
    converted = [convert(category / "train" / "good" / f"00{i}.png", suffix) for i, suffix in enumerate(suffixes)]
    converted += [convert(category / "test" / "good" / "000.png", ".jpg")]
    converted += [convert(category / "test" / "hole" / "000.png", ".jpg")]
    converted += [convert(category / "test" / "scratch" / "001.png", ".bmp")]
    converted += [convert(category / "ground_truth" / "stain" / "002_mask.png", ".tif")]
    (category / "train" / "good" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="anomalib_apc.data"):
        datamodule = set_up(tiny_dataset_copy, num_anomalies=5)

    listed = {path for name in ("train", "test") for path in getattr(datamodule, f"{name}_data").samples.image_path}
    listed |= {row.mask_path for row in anomalous_samples(datamodule)}
    assert {str(path) for path in converted} <= listed
    assert datamodule.split_counts()["train"] == {"normal": tiny_dataset_copy.train_normal, "anomalous": 5}
    assert datamodule.split_counts()["test"] == {
        "normal": tiny_dataset_copy.test_normal,
        "anomalous": tiny_dataset_copy.test_anomalous - 5,
    }
    for row in anomalous_samples(datamodule):
        image, mask = Path(row.image_path), Path(row.mask_path)
        assert (mask.parent.name, mask.stem) == (image.parent.name, f"{image.stem}_mask")
    assert "has no anomalous image" not in caplog.text
    assert "notes.txt" in caplog.text


# Masks paired by name.


def make_folder_dataset(tiny_dataset, root: Path, mask_folders: dict[str, str]) -> dict[Path, Path]:
    """``bad/<type>/NNN.png`` from the tiny dataset with masks in ``masks/<mask_folders[type]>``; the true pairs."""
    shutil.copytree(tiny_dataset.category_dir / "train" / "good", root / "good")
    shutil.copytree(tiny_dataset.category_dir / "test" / "good", root / "test_good")
    pairs = {}
    for defect_type, source in (("scratch", "scratch"), ("dent", "stain")):
        for image in sorted((tiny_dataset.category_dir / "test" / source).iterdir()):
            target = root / "bad" / defect_type / image.name
            mask = root / "masks" / mask_folders[defect_type] / f"{image.stem}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            mask.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
            shutil.copy(tiny_dataset.category_dir / "ground_truth" / source / f"{image.stem}_mask.png", mask)
            pairs[target] = mask
    return pairs


def folder_datamodule(root: Path, abnormal_dir, mask_dir, **overrides) -> SupervisedFolder:
    arguments = {
        "name": "folder",
        "root": root,
        "normal_dir": "good",
        "normal_test_dir": "test_good",
        "abnormal_dir": abnormal_dir,
        "mask_dir": mask_dir,
        "num_anomalies": 4,
        "val_split_mode": "same_as_test",
        "num_workers": 0,
    }
    datamodule = SupervisedFolder(**(arguments | overrides))
    datamodule.setup()
    return datamodule


def assert_masks_are(datamodule, pairs: dict[Path, Path]) -> None:
    seen = {name: 0 for name in ("train", "test")}
    for name in seen:
        samples = getattr(datamodule, f"{name}_data").samples
        for row in samples[samples.label_index == 1].itertuples():
            assert Path(row.mask_path) == pairs[Path(row.image_path)], row.image_path
            seen[name] += 1
    assert seen["train"] == 4 and seen["test"] == len(pairs) - 4


def test_folder_lists_of_folders_pair_masks_folder_by_folder_whatever_their_sort_order(tiny_dataset, tmp_path):
    pairs = make_folder_dataset(tiny_dataset, tmp_path, {"scratch": "1_scratch", "dent": "2_dent"})
    datamodule = folder_datamodule(tmp_path, ["bad/scratch", "bad/dent"], ["masks/1_scratch", "masks/2_dent"])
    assert_masks_are(datamodule, pairs)


def test_folder_with_sub_folders_pairs_masks_by_relative_path(tiny_dataset, tmp_path) -> None:
    pairs = make_folder_dataset(tiny_dataset, tmp_path, {"scratch": "scratch", "dent": "dent"})
    assert_masks_are(folder_datamodule(tmp_path, "bad", "masks"), pairs)


def test_folder_sub_folders_named_unlike_the_mask_folders_are_named_not_guessed(tiny_dataset, tmp_path) -> None:
    make_folder_dataset(tiny_dataset, tmp_path, {"scratch": "1_scratch", "dent": "2_dent"})
    with pytest.raises(MissingInputError, match=r"anomalous image .*bad/dent/000\.png has no mask"):
        folder_datamodule(tmp_path, "bad", "masks")


def test_folder_names_that_are_not_zero_padded_pair_by_name(tiny_dataset, tmp_path) -> None:
    shutil.copytree(tiny_dataset.category_dir / "train" / "good", tmp_path / "good")
    shutil.copytree(tiny_dataset.category_dir / "test" / "good", tmp_path / "test_good")
    sources = sorted((tiny_dataset.category_dir / "test").glob("[!g]*/*.png"))[:12]
    pairs = {}
    for number, image in enumerate(sources, start=1):
        target, mask = tmp_path / "bad" / f"{number}.png", tmp_path / "masks" / f"{number}_mask.png"
        target.parent.mkdir(exist_ok=True)
        mask.parent.mkdir(exist_ok=True)
        shutil.copy(image, target)
        shutil.copy(tiny_dataset.category_dir / "ground_truth" / image.parent.name / f"{image.stem}_mask.png", mask)
        pairs[target] = mask
    assert_masks_are(folder_datamodule(tmp_path, "bad", "masks"), pairs)


@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_two_masks_for_one_image_are_an_error_naming_both(tiny_dataset_copy, layout) -> None:
    masks = tiny_dataset_copy.category_dir / "ground_truth" / "hole"
    shutil.copy(masks / "001_mask.png", masks / "001.png")
    expected = r"masks .*hole/001(_mask)?\.png, .*hole/001(_mask)?\.png have the same name key"
    with pytest.raises(InvalidInputError, match=expected):
        if layout == "mvtec":
            set_up(tiny_dataset_copy)
        else:
            folder_datamodule(
                tiny_dataset_copy.category_dir, "test/hole", "ground_truth/hole", normal_dir="train/good",
                normal_test_dir="test/good", num_anomalies=2,
            )


# Bad files are named at set-up, before any training.


def png_that_verifies_but_does_not_decode(path: Path) -> None:
    """Break the compressed pixel data of a PNG and fix the chunk's checksum, so that ``verify()`` passes."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    data[start + 2 : start + 10] = b"\xff" * 8  # the first deflate block: nothing decodes
    data[start + length : start + length + 4] = struct.pack(">I", zlib.crc32(data[start - 4 : start + length]))
    path.write_bytes(bytes(data))
    with Image.open(path) as image:
        image.verify()


def truncated_jpeg(path: Path) -> Path:
    jpeg = convert(path, ".jpg")
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    return jpeg


@pytest.mark.parametrize(
    ("relative", "breaking"),
    [
        ("train/good/004.png", png_that_verifies_but_does_not_decode),
        ("test/good/001.png", truncated_jpeg),
        ("test/hole/003.png", truncated_jpeg),
        ("ground_truth/stain/002_mask.png", png_that_verifies_but_does_not_decode),
    ],
)
def test_file_that_does_not_decode_is_named_at_set_up(tiny_dataset_copy, relative, breaking) -> None:
    broken = breaking(tiny_dataset_copy.category_dir / relative) or tiny_dataset_copy.category_dir / relative
    with pytest.raises(InvalidInputError, match=rf"cannot read image {broken}"):
        set_up(tiny_dataset_copy)


def png_claiming_size(path: Path, width: int, height: int) -> None:
    """Rewrite the header of a PNG to claim another size (the pixel data stays small)."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IHDR") + 4
    data[start : start + 8] = struct.pack(">II", width, height)
    data[start + 13 : start + 17] = struct.pack(">I", zlib.crc32(data[start - 4 : start + 13]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [(10_000, 9_500), (20_000, 20_000)])
def test_image_too_large_to_decode_safely_is_named_before_decoding(tiny_dataset_copy, size) -> None:
    huge = tiny_dataset_copy.category_dir / "test" / "good" / "002.png"
    png_claiming_size(huge, *size)
    with pytest.raises(InvalidInputError, match=rf"image {huge} is too large to decode safely"):
        set_up(tiny_dataset_copy)


def test_file_broken_after_set_up_is_named_when_read(tiny_dataset_copy) -> None:
    datamodule = set_up(tiny_dataset_copy)
    broken = tiny_dataset_copy.category_dir / "train" / "good" / "007.png"
    broken.write_bytes(b"no longer an image")
    with pytest.raises(InvalidInputError, match=rf"cannot read image {broken}"):
        served_images(datamodule)


# No normal training images.


def test_empty_train_good_is_named_at_set_up(tiny_dataset_copy) -> None:
    good = tiny_dataset_copy.category_dir / "train" / "good"
    for path in good.iterdir():
        path.unlink()
    with pytest.raises(MissingInputError, match=rf"no normal training images in {good}"):
        set_up(tiny_dataset_copy)
    shutil.rmtree(good)
    with pytest.raises(MissingInputError, match=rf"no folder {good}"):
        set_up(tiny_dataset_copy)


def test_empty_folder_normal_dir_is_named_at_set_up(tiny_dataset, tmp_path) -> None:
    (tmp_path / "good").mkdir()
    with pytest.raises(MissingInputError, match=rf"normal_dir {tmp_path / 'good'}: no image files"):
        folder_datamodule(tiny_dataset.category_dir, "test/hole", "ground_truth/hole", normal_dir=tmp_path / "good")


@pytest.mark.parametrize("count", [PROGRESS_BAR_MIN_FILES, 10])
def test_large_sets_are_checked_with_a_progress_bar(tmp_path, capsys, count) -> None:
    paths = []
    for index in range(count):
        paths.append(str(tmp_path / f"{index:04d}.png"))
        Image.new("L", (4, 4), index % 256).save(paths[-1])
    samples = DataFrame({"image_path": paths, "mask_path": "", "label_index": 0})
    check_image_files(samples, "many", num_threads=2)
    shown = capsys.readouterr().err
    assert (f"{count}/{count}" in shown and "many: decoding images" in shown) == (count >= PROGRESS_BAR_MIN_FILES)


def test_anomalous_images_with_all_zero_masks_are_counted_and_named_at_set_up(tiny_dataset_copy, caplog) -> None:
    masks = sorted((tiny_dataset_copy.category_dir / "ground_truth").rglob("*_mask.png"))[:2]
    for mask in masks:
        with Image.open(mask) as image:
            Image.new(image.mode, image.size, 0).save(mask)
    with caplog.at_level(logging.WARNING, logger="anomalib_apc.data"):
        set_up(tiny_dataset_copy, num_anomalies=5)
    assert "2 anomalous image(s) have an all-zero mask" in caplog.text
    for mask in masks:
        assert mask.name.removesuffix("_mask.png") in caplog.text
