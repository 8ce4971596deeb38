"""Every image input is scored like the same image as uint8, or refused by name: seeded random cases, real photos.

A seeded generator stands in for a property-based test library: each case draws a size, a pixel
content and one of the forms a user hands the inferencer (PIL images of every mode, numpy arrays and
torch tensors of every dtype, float images resampled by torch with its antialiased filters), and
says whether that form is a valid image. The invariant: a valid form becomes the same RGB tensor as
the uint8 original (within 1e-6) and gets the same score; an invalid one raises the project's input
error naming the image. The folder test resizes real photos of the three data sets in
``../shared/datasets`` to odd sizes and modes and checks that every file gets a scored row, with
the score it gets alone.
"""

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_apc.deploy import ApcInferencer, predict_folder
from anomalib_apc.deploy.images import to_image_tensors
from anomalib_apc.errors import InvalidInputError

CASES = 300
SCORED_CASES = 60  # the first this many cases also go through the inferencer
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Case:
    """One drawn input: what is handed over, and the RGB tensor it stands for (``None``: must be refused)."""

    form: str
    image: object
    expected: torch.Tensor | None


def _unit(array: np.ndarray) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 array as the ``(3, H, W)`` float tensor of it."""
    return torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)


def _gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _resampled(rgb: np.ndarray, rng: np.random.Generator) -> Case:
    """A float image as a user's own resize makes it: torch's antialiased bilinear or bicubic filter."""
    size = [int(rng.integers(1, 200)), int(rng.integers(1, 200))]
    mode = str(rng.choice(["bilinear", "bicubic"]))
    image = torch.nn.functional.interpolate(_unit(rgb)[None], size=size, mode=mode, antialias=True)[0]
    outside = float(max(-image.min(), image.max() - 1))
    # Bilinear weights are positive, so only rounding leaves [0, 1]; bicubic overshoots at edges for real.
    expected = image.clamp(0, 1) if outside <= TOLERANCE else None
    return Case(f"float resampled ({mode}, {outside:.2g} outside)", image, expected)


def _forms(rgb: np.ndarray, gray: np.ndarray, rng: np.random.Generator) -> dict[str, Callable[[], Case]]:
    rgba = np.concatenate([rgb, rng.integers(0, 256, (*rgb.shape[:2], 1), dtype=np.uint8)], axis=2)
    bits = gray > 127
    broken = _unit(rgb).permute(1, 2, 0).numpy().copy()
    broken.flat[int(rng.integers(broken.size))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    return {
        "PIL RGB": lambda: Case("PIL RGB", Image.fromarray(rgb), _unit(rgb)),
        "PIL L": lambda: Case("PIL L", Image.fromarray(gray), _unit(_gray_rgb(gray))),
        "PIL RGBA": lambda: Case("PIL RGBA", Image.fromarray(rgba), _unit(rgb)),
        "PIL LA": lambda: Case("PIL LA", Image.fromarray(gray).convert("LA"), _unit(_gray_rgb(gray))),
        "PIL P": lambda: Case("PIL P", Image.fromarray(gray).convert("P"), _unit(_gray_rgb(gray))),
        "PIL 1": lambda: Case("PIL 1", Image.fromarray(bits), _unit(_gray_rgb(bits.astype(np.uint8) * 255))),
        "PIL I;16": lambda: Case("PIL I;16", Image.fromarray(gray.astype(np.uint16) * 257), _unit(_gray_rgb(gray))),
        "PIL I": lambda: Case("PIL I", Image.fromarray(gray.astype(np.int32) * 257, mode="I"),
                              _unit(_gray_rgb(gray))),
        "PIL F": lambda: Case("PIL F", Image.fromarray(gray.astype(np.float32) / 255), _unit(_gray_rgb(gray))),
        "numpy uint8 HWC": lambda: Case("numpy uint8 HWC", rgb, _unit(rgb)),
        "numpy uint8 HW": lambda: Case("numpy uint8 HW", gray, _unit(_gray_rgb(gray))),
        "numpy uint8 HWC4": lambda: Case("numpy uint8 HWC4", rgba, _unit(rgb)),
        "numpy uint16": lambda: Case("numpy uint16", rgb.astype(np.uint16) * 257, _unit(rgb)),
        "numpy float32": lambda: Case("numpy float32", rgb.astype(np.float32) / 255, _unit(rgb)),
        "numpy float64": lambda: Case("numpy float64", rgb.astype(np.float64) / 255, _unit(rgb)),
        "torch uint8 CHW": lambda: Case("torch uint8 CHW", torch.from_numpy(rgb).permute(2, 0, 1), _unit(rgb)),
        "torch float CHW": lambda: Case("torch float CHW", _unit(rgb), _unit(rgb)),
        "float resampled": lambda: _resampled(rgb, rng),
        "numpy int64": lambda: Case("numpy int64", rgb.astype(np.int64), None),
        "numpy int32 gray": lambda: Case("numpy int32 gray", gray.astype(np.int32), None),
        "numpy bool": lambda: Case("numpy bool", bits, None),
        "float with NaN or inf": lambda: Case("float with NaN or inf", broken, None),
        "float above 1": lambda: Case("float above 1", rgb.astype(np.float32) / 255 + 1e-3, None),
        "float below 0": lambda: Case("float below 0", rgb.astype(np.float32) / 255 - 2e-6 - 1 / 255, None),
        "uint8 with 2 channels": lambda: Case("uint8 with 2 channels", rgb[..., :2], None),
        "uint8 4D": lambda: Case("uint8 4D", rgb[None], None),
        "uint8 0 rows": lambda: Case("uint8 0 rows", rgb[:0], None),
    }


def draw_cases(count: int, seed: int) -> list[Case]:
    """``count`` cases, cycling through every form so that each is drawn several times, sizes and pixels random."""
    rng = np.random.default_rng(seed)
    cases = []
    for number in range(count):
        height, width = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        rgb[: height // 3] = 255 * rng.integers(0, 2)  # saturated regions, where resampling rounds past 1
        gray = rgb[..., 0].copy()
        forms = _forms(rgb, gray, rng)
        cases.append(list(forms.values())[number % len(forms)]())
    return cases


def test_every_drawn_image_becomes_its_uint8_original_or_is_refused_by_name() -> None:
    cases = draw_cases(CASES, seed=0)
    refused_forms, accepted_forms = set(), set()
    for case in cases:
        if case.expected is None:
            with pytest.raises(InvalidInputError, match=r"^image 0: ") as refusal:
                to_image_tensors([case.image])
            assert "Traceback" not in str(refusal.value)
            refused_forms.add(case.form.split(" (")[0])
            continue
        [(tensor, _)] = to_image_tensors([case.image])
        assert tensor.dtype == torch.float32 and tensor.shape == case.expected.shape, case.form
        assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1, case.form
        torch.testing.assert_close(tensor, case.expected, atol=TOLERANCE, rtol=0, msg=case.form)
        accepted_forms.add(case.form.split(" (")[0])
    assert len(accepted_forms) == 18 and len(refused_forms) >= 9, (accepted_forms, refused_forms)


@pytest.mark.integration
def test_every_drawn_valid_image_is_scored_as_its_uint8_original(bundles) -> None:
    inferencer = ApcInferencer(bundles[0])
    scored = 0
    for case in draw_cases(CASES, seed=0)[:SCORED_CASES]:
        if case.expected is None:
            continue
        original = inferencer.predict([case.expected]).pred_score
        torch.testing.assert_close(inferencer.predict(case.image).pred_score, original, rtol=1e-5, atol=1e-6,
                                   msg=case.form)
        scored += 1
    assert scored >= SCORED_CASES // 2


ODD_COPIES = (((317, 211), "RGB", "png"), ((1023, 769), "L", "jpg"), ((64, 1000), "RGB", "bmp"),
              ((97, 97), "I;16", "png"), ((641, 203), "RGBA", "png"), ((5, 9), "RGB", "tif"))


def _odd_copy(source: Path, folder: Path, size: tuple[int, int], mode: str, suffix: str) -> Path:
    with Image.open(source) as image:
        resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if mode == "I;16":
        resized = Image.fromarray(np.asarray(resized.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        resized = resized.convert(mode)
    name = f"{source.parents[2].name}_{source.parent.name}_{source.stem}_{size[0]}x{size[1]}_{mode.replace(';', '')}"
    path = folder / f"{name}.{suffix}"
    resized.save(path)
    return path


@pytest.mark.integration
def test_real_photos_at_odd_sizes_and_modes_each_get_the_score_they_get_alone(
    bundles, real_categories: list[Path], tmp_path: Path,
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    files = []
    for category in real_categories:
        sources = sorted((category / "test").rglob("*.png"))[::40][:3]
        files += [_odd_copy(source, folder, *copy) for source in sources for copy in ODD_COPIES]
    summary = predict_folder(bundles[0], [folder], tmp_path / "out", batch_size=5, show_progress=False)
    assert (summary.images, summary.scored, summary.failures) == (len(files), len(files), [])
    with (tmp_path / "out" / "scores.csv").open() as scores:
        rows = {row["path"]: row for row in csv.DictReader(scores)}
    assert sorted(rows) == sorted(map(str, files))
    inferencer = ApcInferencer(bundles[0])
    for path in files:
        alone = float(inferencer.predict(path).pred_score)
        assert float(rows[str(path)]["score"]) == pytest.approx(alone, rel=1e-5), path
        height, width = inferencer.prepare(path).images.shape[-2:]
        assert (height, width) == inferencer.image_size
