"""Fuzz: randomly corrupted copies of real images through the datamodule's set-up check.

Every file must end one of two ways: named in the one error the set-up raises, or accepted and read
by the training reader. Nothing may hang, and no other exception may escape.
"""

import io
import shutil
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalib_apc.data import SupervisedMVTecAD, read_image
from anomalib_apc.data.validation import UnusableFilesError

TIME_LIMIT_S = 60.0
ENCODINGS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}
ODD_MODES = ("P", "LA", "CMYK", "I;16", "1", "I", "F", "RGBA")
MODE_SUFFIXES = {"P": ".png", "LA": ".png", "CMYK": ".jpg", "I;16": ".png", "1": ".bmp", "I": ".tif", "F": ".tif"}


def encoded(image: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=ENCODINGS[suffix])
    return buffer.getvalue()


def with_mode(image: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
    gray = np.asarray(image.convert("L"))
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257)
    if mode == "I":  # 16-bit values (readable) or beyond (refused)
        return Image.fromarray(gray.astype(np.int32) * int(rng.choice([257, 4096])))
    if mode == "F":  # in [0, 1] (readable) or in [0, 255] (refused)
        return Image.fromarray(gray.astype(np.float32) / float(rng.choice([255.0, 1.0])))
    return image.convert(mode)


def claimed_size(png: bytes, width: int, height: int) -> bytes:
    data = bytearray(png)
    start = data.index(b"IHDR") + 4
    data[start : start + 8] = struct.pack(">II", width, height)
    data[start + 13 : start + 17] = struct.pack(">I", zlib.crc32(data[start - 4 : start + 13]))
    return bytes(data)


class Source:
    """One real image, encoded once in every format, so that each corrupted copy costs little to make."""

    def __init__(self, path: Path) -> None:
        self.image = Image.open(path).convert("RGB")
        self.small = self.image.resize((96, 96))  # for the copies that are re-encoded (modes, sizes)
        self.encoded = {suffix: encoded(self.image, suffix) for suffix in ENCODINGS}


def corrupt_copy(source: Source, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One corrupted copy of ``source`` of the given kind: its bytes and its file suffix."""
    suffix = str(rng.choice(list(ENCODINGS)))
    data = source.encoded[suffix]
    if kind == "truncated":
        return data[: int(rng.integers(0, len(data)))], suffix
    if kind == "bit_flips":
        flipped = bytearray(data)
        for position in rng.integers(0, len(data) * 8, int(rng.integers(1, 64))):
            flipped[position // 8] ^= 1 << (position % 8)
        return bytes(flipped), suffix
    if kind == "wrong_header":
        return rng.bytes(int(rng.integers(2, 32))) + data[16:], suffix
    if kind == "wrong_extension":
        other = str(rng.choice([other for other in ENCODINGS if other != suffix]))
        return data, other
    if kind == "extreme_size":
        width, height = [(1, 1), (1, 20_000), (20_000, 1), (2, 3)][int(rng.integers(4))]
        return encoded(source.small.resize((width, height)), ".png"), ".png"
    if kind == "odd_mode":
        mode = str(rng.choice(ODD_MODES))
        mode_suffix = MODE_SUFFIXES.get(mode, ".png")
        return encoded(with_mode(source.small, mode, rng), mode_suffix), mode_suffix
    if kind == "empty":
        return b"", suffix
    if kind == "claimed_huge":
        return claimed_size(source.encoded[".png"], 30_000, 30_000), ".png"
    raise AssertionError(kind)


KINDS = (
    "truncated", "bit_flips", "wrong_header", "wrong_extension", "extreme_size", "odd_mode", "empty", "claimed_huge",
)  # fmt: skip


def make_fuzz_category(
    category_dir: Path, normal: list[Path], anomaly: tuple[Path, Path], count: int, seed: int
) -> dict[Path, str]:
    """A category in MVTec AD layout whose train/good holds ``count`` corrupted copies beside good images."""
    for folder in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (category_dir / folder).mkdir(parents=True)
    shutil.copy(normal[0], category_dir / "train" / "good" / "good_0.png")
    shutil.copy(normal[1], category_dir / "test" / "good" / "good_1.png")
    shutil.copy(anomaly[0], category_dir / "test" / "defect" / "000.png")
    shutil.copy(anomaly[1], category_dir / "ground_truth" / "defect" / "000_mask.png")
    rng = np.random.default_rng(seed)
    sources = [Source(path) for path in normal]
    kinds = {}
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        data, suffix = corrupt_copy(sources[int(rng.integers(len(sources)))], kind, rng)
        path = category_dir / "train" / "good" / f"fuzz_{index:03d}{suffix}"
        path.write_bytes(data)
        kinds[path] = kind
    return kinds


def set_up_within_time_limit(datamodule: SupervisedMVTecAD) -> BaseException | None:
    """The exception ``setup()`` raised (or None); fails if it runs past :data:`TIME_LIMIT_S`."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            datamodule.setup()
            outcome.append(None)
        except BaseException as error:  # handed to the test, which checks its type
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT_S)
    assert outcome, f"setup() still running after {TIME_LIMIT_S} s"
    return outcome[0]


def fuzz(tmp_path: Path, normal: list[Path], anomaly: tuple[Path, Path], count: int, seed: int) -> Counter:
    kinds = make_fuzz_category(tmp_path / "fuzz", normal, anomaly, count, seed)
    datamodule = SupervisedMVTecAD(root=tmp_path, category="fuzz", num_anomalies=0, num_workers=2)
    started = time.perf_counter()
    error = set_up_within_time_limit(datamodule)
    elapsed = time.perf_counter() - started

    assert isinstance(error, UnusableFilesError), f"expected the set-up check's error, got {error!r}"
    assert set(map(str, kinds)) <= set(datamodule.train_data.samples.image_path), "a file was dropped silently"
    named = {Path(path) for path in error.problems}
    assert named <= set(kinds), f"good files named: {named - set(kinds)}"
    for path, problem in error.problems.items():
        assert path in problem
    outcomes, by_kind = Counter(), Counter()
    for path, kind in kinds.items():
        if path in named:
            outcomes["named"] += 1
            by_kind[kind, "named"] += 1
            assert kind not in {"wrong_extension"}, f"{path} ({kind}) should be readable: {error.problems[str(path)]}"
            continue
        image = read_image(path)  # accepted by the check, so the training reader must read it
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
        assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
        assert kind not in {"empty", "claimed_huge"}, f"{path} ({kind}) was accepted"
        outcomes["accepted"] += 1
        by_kind[kind, "accepted"] += 1
    print(f"fuzz: {count} files, {dict(outcomes)}, set-up {elapsed:.1f} s; {dict(sorted(by_kind.items()))}")
    return outcomes


def test_fuzzed_tiny_images_are_named_or_readable(tiny_dataset, tmp_path) -> None:
    category = tiny_dataset.category_dir
    normal = sorted((category / "train" / "good").iterdir())[:4]
    anomaly = (category / "test" / "hole" / "000.png", category / "ground_truth" / "hole" / "000_mask.png")
    outcomes = fuzz(tmp_path, normal, anomaly, count=120, seed=0)
    assert outcomes["named"] > 0 and outcomes["accepted"] > 0


def test_fuzzed_mpdd_images_are_named_or_readable(mpdd_root, tmp_path) -> None:
    category = mpdd_root / "metal_plate"
    normal = sorted((category / "train" / "good").iterdir())[:4]
    anomaly = (category / "test" / "defect" / "000.png", category / "ground_truth" / "defect" / "000_mask.png")
    outcomes = fuzz(tmp_path, normal, anomaly, count=200, seed=1)
    assert outcomes["named"] > 0 and outcomes["accepted"] > 0

