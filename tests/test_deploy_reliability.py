"""Deployment under bad input: foreign bundle files, edited metadata, wrong checkpoints, used outputs, bad images.

The bundles here come from untrained models with random memory banks (no training: a few seconds
each); what is tested does not depend on the weights.
"""

import contextlib
import csv
import faulthandler
import io
import json
import os
import pickle
import shutil
import struct
import sys
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from anomalib.models import Patchcore
from conftest import random_bank_model
from PIL import Image

from anomalib_apc.cli import main as apc_main
from anomalib_apc.deploy import ApcInferencer, export_bundle, predict_folder, read_metadata
from anomalib_apc.deploy.images import ImageReadError, list_image_files, read_image_file, to_image_tensors
from anomalib_apc.deploy.metadata import sealed
from anomalib_apc.deploy.search import ApproximateSearch, flat_vectors, nearest_candidate
from anomalib_apc.deploy.search_export import (
    ApproximateIndexRecipe,
    approximate_index_recipe,
    build_approximate_index,
)
from anomalib_apc.errors import InvalidInputError, OutputExistsError
from anomalib_apc.models import AnomalousPatchCore

IMAGE_SIZE = 64
MPDD_CATEGORY = "metal_plate"


@pytest.fixture
def bundle_copy(bundles: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundles[0], tmp_path / "bundle"))


def _edit_metadata(bundle: Path, **changes: object) -> None:
    """Change fields and seal the file again, as an exporter would: the checks behind the seal are under test."""
    path = bundle / "metadata.json"
    path.write_text(json.dumps(sealed(json.loads(path.read_text()) | changes)))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["embedding.bin", "memory_bank.faiss"])
def test_file_from_another_bundle_is_refused(bundles: tuple[Path, Path], bundle_copy: Path, name: str) -> None:
    metadata = read_metadata(bundle_copy)
    assert set(metadata.checksums) == {"embedding.xml", "embedding.bin", "memory_bank.faiss", *metadata.files()}
    ApcInferencer(bundle_copy)  # loads before the swap
    shutil.copyfile(bundles[1] / name, bundle_copy / name)
    with pytest.raises(InvalidInputError, match=f"{name}: its SHA-256 differs"):
        ApcInferencer(bundle_copy)


@pytest.mark.integration
@pytest.mark.parametrize("num_neighbors", [0, 201, 5000, "9"])
def test_num_neighbors_outside_the_memory_bank_is_refused(bundle_copy: Path, num_neighbors: object) -> None:
    _edit_metadata(bundle_copy, num_neighbors=num_neighbors)
    with pytest.raises(InvalidInputError, match=r"metadata.json: num_neighbors is .*from 1 to the 200 memory-bank"):
        ApcInferencer(bundle_copy)


@pytest.mark.integration
def test_num_neighbors_up_to_the_memory_bank_size_loads(bundle_copy: Path) -> None:
    _edit_metadata(bundle_copy, num_neighbors=200)
    assert ApcInferencer(bundle_copy).scoring.num_neighbors == 200


def _post_processor(class_path: str) -> dict:
    return {"class_path": class_path, "config": {}, "state": {}}


@pytest.mark.integration
@pytest.mark.parametrize("class_path", ["os.abort", "builtins.print", "torch.nn.Identity"])
def test_post_processor_class_path_must_be_a_post_processor(bundle_copy: Path, class_path: str) -> None:
    # os.abort would end the test run and print would write to stdout, were they called.
    _edit_metadata(bundle_copy, post_processor=_post_processor(class_path))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(
        InvalidInputError, match=rf"class_path '{class_path}' is not a subclass of anomalib's PostProcessor",
    ):
        ApcInferencer(bundle_copy)
    assert printed.getvalue() == ""


@pytest.mark.integration
def test_post_processor_class_path_that_does_not_import_is_refused(bundle_copy: Path) -> None:
    _edit_metadata(bundle_copy, post_processor=_post_processor("no_such_module.PostProcessor"))
    with pytest.raises(InvalidInputError, match=r"'no_such_module\.PostProcessor' cannot be imported"):
        ApcInferencer(bundle_copy)
    _edit_metadata(bundle_copy, post_processor=_post_processor("anomalib.post_processing.PostProcessor"))
    assert ApcInferencer(bundle_copy).post_processor is not None


class _CodeExecuting:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _patchcore_checkpoint(path: Path) -> Path:
    """What Lightning writes for anomalib's Patchcore: its weights and hyper-parameters."""
    model = Patchcore(backbone="resnet18", pre_trained=False, visualizer=False)
    torch.save({"epoch": 0, "global_step": 1, "state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["random bytes", "pickle", "pickle protocol 4", "torch.save", "patchcore",
                                  "no state_dict"])
def test_export_of_a_bad_checkpoint_is_one_line_naming_the_file(kind: str, tmp_path: Path, capsys) -> None:
    checkpoint, marker = tmp_path / f"{kind.replace(' ', '_')}.ckpt", tmp_path / "code_ran"
    if kind == "random bytes":
        checkpoint.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind.startswith("pickle"):
        protocol = 4 if kind.endswith("4") else 2
        checkpoint.write_bytes(pickle.dumps({"state_dict": _CodeExecuting(marker)}, protocol=protocol))
    elif kind == "torch.save":
        torch.save({"state_dict": _CodeExecuting(marker)}, checkpoint)
    elif kind == "patchcore":
        _patchcore_checkpoint(checkpoint)
    else:
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    expected = {
        "random bytes": "not a PyTorch checkpoint that can be read safely",
        "pickle": "refused: the file holds Python objects other than tensors and plain data (posix.system)",
        "pickle protocol 4": "not a PyTorch checkpoint that can be read safely",
        "torch.save": "refused: the file holds Python objects other than tensors and plain data (posix.system)",
        "patchcore": "not an AnomalousPatchCore checkpoint",
        "no state_dict": "not a Lightning checkpoint",
    }[kind]
    assert apc_main(["export-bundle", "--ckpt", str(checkpoint), "--output", str(tmp_path / "bundle")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    assert len(error) < 400
    assert f"{checkpoint}: {expected}" in error
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists()


def test_approximate_search_equals_exact_re_ranking_of_the_candidates() -> None:
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((6, 48)).astype(np.float32)
    bank = (rng.standard_normal((1000, 6)) @ basis + 0.3 * rng.standard_normal((1000, 48))).astype(np.float32)
    queries = (rng.standard_normal((300, 6)) @ basis + 0.3 * rng.standard_normal((300, 48))).astype(np.float32)
    exact = faiss.IndexFlatL2(48)
    exact.add(bank)
    # A product-quantised index ranks by approximate distances, which the refinement must replace.
    quantised = ApproximateIndexRecipe("ivf", "IVF16,PQ8x4", "nprobe=4", candidates=8)
    for recipe in (*(approximate_index_recipe(name, *bank.shape) for name in ("hnsw", "ivf", "pca")), quantised):
        index = build_approximate_index(bank, recipe)
        distances, ids = ApproximateSearch(index, exact, recipe.candidates).nearest(queries)
        _, candidates = index.search(queries, recipe.candidates)
        expected_distances, expected_ids = nearest_candidate(queries, flat_vectors(exact), candidates)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(distances, expected_distances)
        hand = ((queries[:, None, :] - bank[candidates.clip(min=0)]) ** 2).sum(-1).min(1)
        np.testing.assert_allclose(distances, hand, rtol=1e-4)


# ---- predict -------------------------------------------------------------------------------------


def _rows(output: Path) -> list[dict[str, str]]:
    with (output / "scores.csv").open() as scores:
        return list(csv.DictReader(scores))


def _image(path: Path, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), seed: int = 0, mode: str = "RGB") -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.mark.integration
def test_predict_into_a_used_output_needs_overwrite_and_leaves_no_stale_overlay(bundles, tmp_path: Path) -> None:
    first, second = _image(tmp_path / "in" / "first.png", seed=1), _image(tmp_path / "in" / "second.png", seed=2)
    output = tmp_path / "out"
    predict_folder(bundles[0], [first, second], output, show_progress=False)
    assert len(list((output / "overlays").iterdir())) == 2
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict_folder(bundles[0], [first], output, show_progress=False)
    summary = predict_folder(bundles[0], [first], output, overwrite=True, show_progress=False)
    assert summary.scored == summary.images == 1
    assert [row["path"] for row in _rows(output)] == [str(first)]
    assert [path.name for path in (output / "overlays").iterdir()] == ["first.png.png"]
    (tmp_path / "not_predictions").mkdir()
    (tmp_path / "not_predictions" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"notes\.txt"):
        predict_folder(bundles[0], [first], tmp_path / "not_predictions", overwrite=True, show_progress=False)
    assert (tmp_path / "not_predictions" / "notes.txt").read_text() == "mine"


@pytest.mark.integration
def test_predict_cli_refuses_a_used_output(bundles, tmp_path: Path, capsys) -> None:
    image, output = _image(tmp_path / "a.png"), tmp_path / "out"
    command = ["predict", "--bundle", str(bundles[0]), "--output", str(output), str(image)]
    assert apc_main(command) == 0
    assert apc_main(command) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert apc_main([*command, "--overwrite"]) == 0


@pytest.mark.integration
def test_same_name_with_two_suffixes_gets_two_overlays(bundles, tmp_path: Path) -> None:
    png, jpg = _image(tmp_path / "in" / "a.png", seed=1), _image(tmp_path / "in" / "a.jpg", seed=2)
    other = _image(tmp_path / "in" / "sub" / "a.png", seed=3)
    predict_folder(bundles[0], [tmp_path / "in", png], tmp_path / "out", show_progress=False)
    rows = _rows(tmp_path / "out")
    assert [row["path"] for row in rows] == [str(jpg), str(png), str(other)]  # png named twice: one row
    overlays = [Path(row["overlay"]) for row in rows]
    assert [path.relative_to(tmp_path / "out" / "overlays") for path in overlays] == [
        Path("a.jpg.png"), Path("a.png.png"), Path("sub/a.png.png")]
    assert all(path.is_file() for path in overlays)


def _decompression_bomb_png(path: Path, width: int = 14000, height: int = 14000) -> Path:
    """A valid 1-bit PNG of ``width`` x ``height`` pixels, which PIL refuses as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytes(height * (1 + (width + 7) // 8))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.integration
def test_every_input_gets_a_row_and_a_bomb_does_not_stop_the_run(bundles, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    before = [_image(inputs / f"0{number}.png", seed=number) for number in range(3)]
    bomb = _decompression_bomb_png(inputs / "10_bomb.png")
    after = [_image(inputs / f"2{number}.png", seed=number) for number in range(3)]
    summary = predict_folder(bundles[0], [inputs], tmp_path / "out", batch_size=2, show_progress=False)
    rows = _rows(tmp_path / "out")
    assert [row["path"] for row in rows] == [str(path) for path in [*before, bomb, *after]]
    bomb_row = rows[3]
    assert bomb_row["status"].startswith(f"{bomb}: cannot read this file as an image (DecompressionBombError")
    assert bomb_row["score"] == ""
    assert all(row["status"] == "ok" and float(row["score"]) > 0 for row in rows if row is not bomb_row)
    assert (summary.images, summary.scored, len(summary.failures)) == (7, 6, 1)


class _InterruptedInferencer(ApcInferencer):
    """Stops (as Ctrl-C would) at its second batch, noting what ``scores.csv`` holds on disk by then."""

    def __init__(self, bundle: Path, scores_file: Path) -> None:
        super().__init__(bundle)
        self.scores_file = scores_file
        self.calls = 0
        self.on_disk_when_stopped = ""

    def predict(self, images: list[torch.Tensor]) -> object:
        self.calls += 1
        if self.calls == 2:
            self.on_disk_when_stopped = self.scores_file.read_text()
            raise KeyboardInterrupt
        return super().predict(images)


@pytest.mark.integration
def test_interrupted_run_keeps_the_rows_it_scored(bundles, tmp_path: Path) -> None:
    images = [_image(tmp_path / "in" / f"{number}.png", seed=number) for number in range(5)]
    inferencer = _InterruptedInferencer(bundles[0], tmp_path / "out" / "scores.csv")
    with pytest.raises(KeyboardInterrupt):
        predict_folder(inferencer, images, tmp_path / "out", batch_size=2, show_progress=False)
    # The first batch was on disk before the second started (a killed process keeps it), and stays.
    written = list(csv.DictReader(io.StringIO(inferencer.on_disk_when_stopped)))
    assert [row["path"] for row in written] == [str(path) for path in images[:2]]
    assert [row["path"] for row in _rows(tmp_path / "out")] == [str(path) for path in images[:2]]


def test_large_images_are_reduced_as_they_are_read(tmp_path: Path) -> None:
    path = _image(tmp_path / "large.png", size=(1000, 800))
    reduced = read_image_file(path, size=(IMAGE_SIZE, IMAGE_SIZE))
    full = read_image_file(path)
    assert reduced.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert full.shape == (3, 800, 1000)
    expected = torch.nn.functional.interpolate(full[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                               antialias=True)[0]
    assert (reduced - expected).abs().mean() < 0.01
    jpeg = tmp_path / "large.jpg"
    Image.open(path).save(jpeg, quality=95)
    assert read_image_file(jpeg, size=(IMAGE_SIZE, IMAGE_SIZE)).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("size", [(600, 500), (40, 30)])
def test_sixteen_bit_images_keep_their_scaling_when_read_to_size(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full(size[::-1], 32768, dtype=np.uint16)).save(path)
    image = read_image_file(path, size=(IMAGE_SIZE, IMAGE_SIZE))
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(image, torch.full_like(image, 32768 / 65535), atol=1e-4, rtol=0)


# ---- fuzz ----------------------------------------------------------------------------------------

FUZZ_FILES = {"generated": 200, "mpdd": 100}  # with a bomb and an empty file each
ODD_MODES = ("P", "LA", "CMYK", "I;16", "1", "RGBA", "I", "F", "L")


def _encoded(image: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpg": "JPEG", "bmp": "BMP", "tif": "TIFF"}[suffix])
    return buffer.getvalue()


def _odd_mode(image: Image.Image, mode: str) -> tuple[Image.Image, str]:
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257), "png"
    if mode == "F":
        return image.convert("L").convert("F"), "tif"  # values 0..255: not in [0, 1], an error row
    converted = image.convert(mode)
    return converted, {"CMYK": "jpg", "1": "bmp", "I": "tif"}.get(mode, "png")


def _corrupted_copies(sources: list[Path], folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` files made from ``sources`` by seeded random corruptions; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    kinds = ("truncate", "bit flips", "wrong header", "extreme size", "odd mode", "odd mode truncated", "intact")
    paths = []
    for number in range(count):
        kind = kinds[number % len(kinds)]
        with Image.open(sources[rng.integers(len(sources))]) as source:
            image = source.convert("RGB")
        suffix = str(rng.choice(["png", "jpg", "bmp", "tif"]))
        if kind == "extreme size":
            width, height = [(1, 1), (1, 700), (700, 1), (2, 3), (3000, 2)][rng.integers(5)]
            image = image.resize((width, height))
        if kind.startswith("odd mode"):
            image, suffix = _odd_mode(image, str(rng.choice(ODD_MODES)))
        data = bytearray(_encoded(image, suffix))
        if kind in ("truncate", "odd mode truncated"):
            data = data[: rng.integers(0, len(data))]
        elif kind == "bit flips":
            for position in rng.integers(0, len(data), rng.integers(1, 40)):
                data[position] ^= 1 << int(rng.integers(8))
        elif kind == "wrong header":
            magic = [b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"\x89PNG\r\n\x1a\n", rng.bytes(8)]
            header = magic[rng.integers(len(magic))]
            data[: len(header)] = header
        path = folder / f"{number:03d}_{kind.replace(' ', '_')}.{suffix}"
        path.write_bytes(bytes(data))
        paths.append(path)
    paths.append(_decompression_bomb_png(folder / "bomb.png"))
    paths.append(folder / "empty.png")
    paths[-1].write_bytes(b"")
    return paths


def _fuzz(bundle: Path, sources: list[Path], count: int, tmp_path: Path, capsys) -> tuple[int, int]:
    files = _corrupted_copies(sources, tmp_path / "fuzz", count, seed=0)
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)  # a hang ends the run, not blocks it
    try:
        status = apc_main(["predict", "--bundle", str(bundle), "--output", str(tmp_path / "out"),
                           str(tmp_path / "fuzz")])
    finally:
        faulthandler.cancel_dump_traceback_later()
    error = capsys.readouterr().err
    assert "Traceback" not in error
    rows = _rows(tmp_path / "out")
    assert sorted(row["path"] for row in rows) == sorted(map(str, files))
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        assert row["status"].startswith(f"{row['path']}: ")
        assert row["status"] in error
    for row in rows:
        if row["status"] == "ok":
            assert np.isfinite(float(row["score"]))
            assert Path(row["overlay"]).is_file()
    assert status == (1 if failed else 0)
    return len(rows) - len(failed), len(failed)


@pytest.mark.integration
def test_fuzzed_generated_images_are_each_scored_or_named(bundles, tiny_dataset, tmp_path: Path, capsys) -> None:
    sources = list_image_files([tiny_dataset.category_dir / "test"])
    scored, failed = _fuzz(bundles[0], sources, FUZZ_FILES["generated"], tmp_path, capsys)
    print(f"fuzz (generated images): {scored} scored, {failed} named with their error")
    assert scored > 50 and failed > 50


@pytest.mark.integration
def test_fuzzed_mpdd_images_are_each_scored_or_named(bundles, mpdd_root: Path, tmp_path: Path, capsys) -> None:
    sources = list_image_files([mpdd_root / MPDD_CATEGORY / "train" / "good"])[:10]
    scored, failed = _fuzz(bundles[0], sources, FUZZ_FILES["mpdd"], tmp_path, capsys)
    print(f"fuzz (MPDD {MPDD_CATEGORY}): {scored} scored, {failed} named with their error")
    assert scored > 25 and failed > 25


# Real images, real faults: resampled photos, refused images inside a batch, two runs into one folder,
# an edited metadata.json, and inputs that used to pass silently or as raw tracebacks.

def _saturated_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """An RGB photo-like image (bright, half of it white) that an antialiased resize takes just above 1.0."""
    pixels = np.random.default_rng(seed).integers(200, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.integration
def test_resampled_photos_are_scored_not_refused(bundles, tmp_path: Path) -> None:
    photos = [_saturated_photo(tmp_path / "in" / f"{n}.png", (97 + 13 * n, 71 + 7 * n), seed=n) for n in range(6)]
    assert all(float(read_image_file(path, size=(IMAGE_SIZE, IMAGE_SIZE)).max()) == 1.0 for path in photos)
    summary = predict_folder(bundles[0], [tmp_path / "in"], tmp_path / "out", batch_size=4, show_progress=False)
    assert (summary.scored, summary.failures) == (6, [])
    inferencer = ApcInferencer(bundles[0])
    resampled = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(Image.open(photos[0]), dtype=np.float32) / 255).permute(2, 0, 1)[None],
        size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)[0].clamp(min=0.0) * (1 + 5e-7)
    assert float(resampled.max()) > 1.0
    as_read = inferencer.predict([resampled.clamp(max=1.0)]).pred_score
    torch.testing.assert_close(inferencer.predict([resampled]).pred_score, as_read)


def test_a_float_image_really_outside_the_unit_range_is_refused_with_its_value() -> None:
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    image[0, 0, 0] = 1.0001
    with pytest.raises(InvalidInputError, match=r"image 0: a float image must lie in \[0, 1\].*1\.00010002\]"):
        to_image_tensors([image])


@pytest.mark.parametrize(("image", "message"), [
    (np.full((8, 8, 3), np.nan, dtype=np.float32), r"image 0: 192 of 192 values are NaN or infinite"),
    (np.full((8, 8), np.inf, dtype=np.float64), r"image 0: 64 of 64 values are NaN or infinite"),
    (np.zeros((8, 8, 3), dtype=np.int64), r"image 0: int64 pixels .* no known range"),
    (np.full((8, 8), 200, dtype=np.int32), r"image 0: int32 pixels \(values 200 to 200\)"),
    (np.zeros((0, 0, 3), dtype=np.uint8), r"image 0: an empty image"),
    (torch.zeros(3, 0, 5), r"image 0: an empty image"),
])
def test_images_that_used_to_be_scored_or_crash_are_refused_by_name(image: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        to_image_tensors([image])


@pytest.mark.integration
def test_predict_of_no_image_is_refused_by_name(bundles) -> None:
    with pytest.raises(InvalidInputError, match="No image given"):
        ApcInferencer(bundles[0]).predict([])


class _RefusingInferencer(ApcInferencer):
    """Refuses (as its input checks would) any batch holding a nearly white image."""

    def prepare(self, images: list[torch.Tensor]) -> object:
        if any(float(image.mean()) > 0.95 for image in images):
            msg = "image 0: refused for the test"
            raise ImageReadError(msg)
        return super().prepare(images)


@pytest.mark.integration
def test_an_image_refused_inside_a_batch_costs_only_its_own_row(bundles, tmp_path: Path, capsys) -> None:
    images = [_image(tmp_path / "in" / f"{n}.png", seed=n) for n in range(5)]
    white = tmp_path / "in" / "2_white.png"
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white").save(white)
    summary = predict_folder(_RefusingInferencer(bundles[0]), [tmp_path / "in"], tmp_path / "out", batch_size=8,
                             show_progress=False)
    rows = _rows(tmp_path / "out")
    assert [row["path"] for row in rows] == [str(path) for path in sorted([*images, white])]
    refused = [row for row in rows if row["status"] != "ok"]
    assert [row["path"] for row in refused] == [str(white)]
    assert refused[0]["status"] == f"{white}: cannot be scored (ImageReadError: image 0: refused for the test)"
    assert (summary.images, summary.scored, summary.failures) == (6, 5, [refused[0]["status"]])


@pytest.mark.integration
def test_predict_cli_says_how_many_failed(bundles, tmp_path: Path, capsys) -> None:
    good, empty = _image(tmp_path / "in" / "a.png"), tmp_path / "in" / "b.png"
    empty.write_bytes(b"")
    status = apc_main(["predict", "--bundle", str(bundles[0]), "--output", str(tmp_path / "out"), str(tmp_path / "in")])
    output = capsys.readouterr()
    assert status == 1
    assert "Scored 1 of 2 images, 1 failed" in output.out
    assert "1 of 2 file(s) could not be scored" in output.err and str(empty) in output.err
    assert [row["path"] for row in _rows(tmp_path / "out")] == [str(good), str(empty)]


class _SecondRunInferencer(ApcInferencer):
    """Starts a second prediction into the same output while the first one is scoring its first batch."""

    def __init__(self, bundle: Path, images: list[Path], output: Path) -> None:
        super().__init__(bundle)
        self.images, self.output = images, output
        self.second_run_error: Exception | None = None

    def predict(self, images: list[torch.Tensor]) -> object:
        if self.second_run_error is None:
            try:
                predict_folder(ApcInferencer(self.bundle), self.images[:1], self.output, overwrite=True,
                               show_progress=False)
            except OutputExistsError as error:
                self.second_run_error = error
        return super().predict(images)


@pytest.mark.integration
def test_a_second_run_into_a_folder_in_use_is_refused_and_leaves_the_first_intact(bundles, tmp_path: Path) -> None:
    images = [_image(tmp_path / "in" / f"{n}.png", seed=n) for n in range(4)]
    output = tmp_path / "out"
    inferencer = _SecondRunInferencer(bundles[0], images, output)
    summary = predict_folder(inferencer, images, output, batch_size=2, show_progress=False)
    assert isinstance(inferencer.second_run_error, OutputExistsError)
    assert "another predict is writing into this folder now" in str(inferencer.second_run_error)
    assert summary.scored == 4
    assert [row["path"] for row in _rows(output)] == [str(path) for path in images]
    assert sorted(path.name for path in (output / "overlays").iterdir()) == [f"{n}.png.png" for n in range(4)]
    assert sorted(path.name for path in output.iterdir()) == [".anomalib-apc.lock", "overlays", "scores.csv"]
    again = predict_folder(bundles[0], images[:1], output, overwrite=True, show_progress=False)  # lock released
    assert again.scored == 1


@pytest.mark.integration
def test_scores_file_is_replaced_whole_and_a_killed_runs_partial_file_is_replaced(bundles, tmp_path: Path) -> None:
    images = [_image(tmp_path / "in" / f"{n}.png", seed=n) for n in range(3)]
    output = tmp_path / "out"
    output.mkdir()
    (output / ".scores.csv.partial").write_text("path,status\nhalf a ro")  # what a SIGKILL mid-write leaves
    predict_folder(bundles[0], images, output, batch_size=1, overwrite=True, show_progress=False)
    assert not (output / ".scores.csv.partial").exists()
    assert [row["path"] for row in _rows(output)] == [str(path) for path in images]


def _edited(value: object) -> object:
    """Another value of the same kind, as a hand edit would make."""
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[0] if value else 0]
    return {**value, "edited": 1}


def _metadata_edits() -> list[tuple[str, ...]]:
    """Every top-level field of a bundle's metadata.json, and every post-processor statistic."""
    fields = ["num_neighbors", "image_size", "embedding_dim", "feature_map_size", "memory_bank_size", "precision",
              "pre_processor", "post_processor", "anomaly_map_sigma", "segmentation_fusion", "exact_search",
              "approximate_search", "checksums", "provenance", "format", "format_version", "architecture"]
    statistics = ["_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max"]
    return [(name,) for name in fields] + [("post_processor", "state", name) for name in statistics]


@pytest.fixture(scope="module")
def labelled_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with a post-processor's thresholds and statistics, so that they too can be edited."""
    model = AnomalousPatchCore(
        backbone="resnet18", pre_trained=False, finetune_epochs=0, visualizer=False, seed=0,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(IMAGE_SIZE, IMAGE_SIZE)),
    ).eval()
    model.model.memory_bank = torch.randn(200, 384, generator=torch.Generator().manual_seed(0))
    for name, value in {"_image_threshold": 2.0, "_pixel_threshold": 2.5, "image_min": 1.0, "image_max": 3.0,
                        "pixel_min": 0.5, "pixel_max": 4.0}.items():
        getattr(model.post_processor, name).fill_(value)
    return export_bundle(model, tmp_path_factory.mktemp("labelled") / "bundle")


@pytest.mark.integration
@pytest.mark.parametrize("keys", _metadata_edits(), ids=lambda keys: ".".join(keys))
def test_every_edit_of_the_metadata_is_refused(labelled_bundle: Path, tmp_path: Path, keys: tuple[str, ...]) -> None:
    bundle = Path(shutil.copytree(labelled_bundle, tmp_path / "bundle"))
    path = bundle / "metadata.json"
    fields = json.loads(path.read_text())
    ApcInferencer(bundle)  # loads as exported
    parent = fields
    for key in keys[:-1]:
        parent = parent[key]
    assert keys[-1] in parent, f"{'.'.join(keys)} is not in metadata.json"
    parent[keys[-1]] = _edited(parent[keys[-1]])
    path.write_text(json.dumps(fields, indent=2))
    with pytest.raises(InvalidInputError, match=r"metadata\.json: .*(content_sha256|format|architecture)"):
        ApcInferencer(bundle)


@pytest.mark.integration
def test_metadata_holds_no_field_that_inference_ignores(labelled_bundle: Path) -> None:
    fields = json.loads((labelled_bundle / "metadata.json").read_text())
    assert set(fields) == {name for (name, *_) in _metadata_edits()} | {"content_sha256"}
    assert "normalization" not in fields and set(fields["provenance"]) == {
        "backbone", "layers", "versions", "source_checkpoint", "memory_bank", "verification"}
    assert fields["post_processor"]["state"]["_image_threshold"] == 2.0


@pytest.mark.integration
def test_links_in_an_input_folder_each_get_a_row_or_a_warning(bundles, tmp_path: Path, caplog) -> None:
    inputs = tmp_path / "in"
    image = _image(inputs / "a.png")
    (inputs / "loop.png").symlink_to("loop.png")
    (inputs / "dangling.png").symlink_to("missing.png")
    (inputs / "linked").symlink_to(_image(tmp_path / "elsewhere" / "b.png").parent)
    (inputs / "up").symlink_to(".")
    with caplog.at_level("WARNING"):
        summary = predict_folder(bundles[0], [inputs], tmp_path / "out", show_progress=False)
    rows = {Path(row["path"]).name: row["status"] for row in _rows(tmp_path / "out")}
    assert rows == {
        "a.png": "ok",
        "b.png": "ok",
        "dangling.png": f"{inputs / 'dangling.png'}: a broken symbolic link (to missing.png), no image file behind it.",
        "loop.png": f"{inputs / 'loop.png'}: a symbolic link loop (the link leads back to itself), not an image file.",
    }
    assert (summary.images, summary.scored) == (4, 2)
    assert f"{inputs}: 1 linked folder(s) lead back to a folder already searched" in caplog.text
    assert str(image) in {row["path"] for row in _rows(tmp_path / "out")}


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["int8", "int8-acq"])
def test_int8_without_nncf_is_refused_before_the_bundle_it_would_overwrite_is_touched(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str,
) -> None:
    calibration = tmp_path / "calibration"
    for number in range(2):
        _image(calibration / f"{number}.png", seed=number)
    before = {path.name: path.read_bytes() for path in bundle_copy.iterdir()}
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if it were not installed
    expected = rf"--precision {precision}: .*nncf, which is not installed: .*anomalib-apc\[quantization\]"
    with pytest.raises(InvalidInputError, match=expected):
        export_bundle(random_bank_model(0), bundle_copy, precision=precision, calibration_images=calibration,
                      validation_images=calibration, overwrite=True)
    assert {path.name: path.read_bytes() for path in bundle_copy.iterdir()} == before
