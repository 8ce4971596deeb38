"""A small synthetic dataset in MVTec AD layout, made offline in a second.

It lets the whole pipeline (split, fine-tuning, memory bank, comparison) run on a CPU without
downloading anything. Every image shows a textured, brushed-metal background and a washer-like
part (a ring with six rivets at a random rotation), under a random illumination gradient, with a
few harmless dust specks. Defects are drawn onto such images and their masks are the drawn pixels.
They are small and of random strength, from plainly visible to barely above the texture, so that
neither PatchCore nor APC separates every one from the normal images:

- ``scratch``: a thin, slightly brighter line across the part,
- ``stain``: a faint, irregular discolouration,
- ``hole``: a small dent, darker inside with a lighter rim.

Usage::

    python -m anomalib_apc.data.demo datasets/demo_root            # writes datasets/demo_root/demo
    python -m anomalib_apc.data.demo datasets/demo_root --seed 1 --category demo1
"""

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomalib_apc.data.image_files import is_image_file
from anomalib_apc.errors import OutputExistsError

logger = logging.getLogger(__name__)

DEFECT_TYPES = ("scratch", "stain", "hole")
NUM_RIVETS = 6

DefectPainter = Callable[[np.ndarray, "_Part", np.random.Generator], np.ndarray]


class _Part:
    """Where the washer-like part lies in one image, so defects can be put on it."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.center = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
        self.outer_radius = 0.32 * size
        self.inner_radius = 0.14 * size
        self.rivet_angles = rng.uniform(0, 2 * np.pi) + np.arange(NUM_RIVETS) * 2 * np.pi / NUM_RIVETS

    def point_on_ring(self, rng: np.random.Generator) -> np.ndarray:
        """A random point between the inner and outer edge of the ring, away from both edges."""
        angle = rng.uniform(0, 2 * np.pi)
        radius = rng.uniform(self.inner_radius + 0.25 * self.ring_width, self.outer_radius - 0.25 * self.ring_width)
        return self.center + radius * np.array([np.cos(angle), np.sin(angle)])

    @property
    def ring_width(self) -> float:
        return self.outer_radius - self.inner_radius


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    category: str = "demo",
    image_size: int = 128,
    num_train: int = 30,
    num_test_normal: int = 20,
    num_per_defect_type: int = 20,
) -> Path:
    """Write the demo dataset to ``root/category`` in MVTec AD layout and return that category folder.

    The layout is ``train/good``, ``test/good``, ``test/<defect_type>`` and
    ``ground_truth/<defect_type>/<name>_mask.png`` (0 or 255), as ``MVTecAD(root, category)`` reads it.
    The same arguments always give the same files, so running it again is harmless.

    Args:
        root: Folder that receives the category folder.
        seed: Seed of every random choice; another seed gives another dataset.
        category: Name of the category folder.
        image_size: Width and height of the square RGB images.
        num_train: Normal training images.
        num_test_normal: Normal test images.
        num_per_defect_type: Anomalous test images of each defect type (see ``DEFECT_TYPES``).

    Raises:
        OutputExistsError: If the category folder holds images this call would not write (e.g. from
            other counts), which would otherwise end up in the dataset.
    """
    category_dir = Path(root) / category
    groups: list[tuple[str, str, int]] = [("train", "good", num_train), ("test", "good", num_test_normal)]
    groups += [("test", defect_type, num_per_defect_type) for defect_type in DEFECT_TYPES]
    images = {
        category_dir / split / kind / f"{index:03d}.png": (split, kind, index)
        for split, kind, count in groups
        for index in range(count)
    }
    masks = {
        category_dir / "ground_truth" / kind / f"{index:03d}_mask.png"
        for split, kind, count in groups
        if kind != "good"
        for index in range(count)
    }
    _refuse_foreign_images(category_dir, set(images) | masks)

    painters: dict[str, DefectPainter] = {"scratch": _paint_scratch, "stain": _paint_stain, "hole": _paint_hole}
    for path, (split, kind, index) in images.items():
        rng = np.random.default_rng([seed, ["train", "test"].index(split), [*DEFECT_TYPES, "good"].index(kind), index])
        image, part = _normal_image(image_size, rng)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind != "good":
            mask = painters[kind](image, part, rng)
            mask_path = category_dir / "ground_truth" / kind / f"{index:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        Image.fromarray(_to_uint8(image)).save(path)
    logger.info("Wrote the demo dataset (%d images, seed %d) to %s", len(images), seed, category_dir)
    return category_dir


def _refuse_foreign_images(category_dir: Path, expected: set[Path]) -> None:
    foreign = sorted(path for path in category_dir.rglob("*") if is_image_file(path) and path not in expected)
    if foreign:
        listed = ", ".join(str(path) for path in foreign[:5])
        msg = (
            f"{category_dir} already holds {len(foreign)} image(s) that make_demo_dataset would not write "
            f"(e.g. {listed}); remove the folder or choose another root or category."
        )
        raise OutputExistsError(msg)


def _normal_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, _Part]:
    """A defect-free image as float RGB in [0, 1] (H, W, 3), and where its part lies."""
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(-0.15, 0.15)
    brushing = 0.04 * np.sin(2 * np.pi * (60 * (x * np.cos(angle) + y * np.sin(angle))) + rng.uniform(0, 2 * np.pi))
    background = 0.45 + brushing + rng.normal(0, 0.025, (size, size))
    image = np.repeat(background[..., None], 3, axis=2) * np.array([0.95, 0.97, 1.0])

    part = _Part(size, rng)
    distance = np.hypot(x * size - part.center[0], y * size - part.center[1])
    ring = (distance <= part.outer_radius) & (distance >= part.inner_radius)
    shading = 0.1 * (distance - part.inner_radius) / part.ring_width
    bronze = np.array([0.72, 0.55, 0.32])
    image[ring] = (bronze - shading[ring, None]) + rng.normal(0, 0.015, (int(ring.sum()), 1))
    rivet_radius = 0.12 * part.ring_width
    rivet_distance = (part.inner_radius + part.outer_radius) / 2
    for rivet_angle in part.rivet_angles:
        rivet_center = part.center + rivet_distance * np.array([np.cos(rivet_angle), np.sin(rivet_angle)])
        rivet = np.hypot(x * size - rivet_center[0], y * size - rivet_center[1]) <= rivet_radius
        image[rivet] = [0.35, 0.33, 0.3]

    for _ in range(rng.poisson(4)):
        speck_center, speck_radius = rng.uniform(0, size, 2), rng.uniform(0.004, 0.012) * size
        speck = np.hypot(x * size - speck_center[0], y * size - speck_center[1]) <= speck_radius
        image[speck] *= rng.uniform(0.75, 0.9)

    gradient_angle = rng.uniform(0, 2 * np.pi)
    illumination = 1 + 0.2 * ((x - 0.5) * np.cos(gradient_angle) + (y - 0.5) * np.sin(gradient_angle))
    return np.clip(image * illumination[..., None], 0, 1), part


def _paint_scratch(image: np.ndarray, part: _Part, rng: np.random.Generator) -> np.ndarray:
    start = part.point_on_ring(rng)
    angle = rng.uniform(0, 2 * np.pi)
    end = start + rng.uniform(0.08, 0.22) * part.size * np.array([np.cos(angle), np.sin(angle)])
    mask = _draw_mask(part.size, lambda draw: draw.line([*start, *end], fill=1, width=max(1, part.size // 96)))
    image[mask] = np.clip(image[mask] + rng.uniform(0.05, 0.2), 0, 1)
    return mask


def _paint_stain(image: np.ndarray, part: _Part, rng: np.random.Generator) -> np.ndarray:
    center = part.point_on_ring(rng)
    blobs = [(center + rng.normal(0, 0.02, 2) * part.size, rng.uniform(0.015, 0.04, 2) * part.size)
             for _ in range(rng.integers(1, 4))]

    def draw_blobs(draw: ImageDraw.ImageDraw) -> None:
        for (cx, cy), (rx, ry) in blobs:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)

    mask = _draw_mask(part.size, draw_blobs)
    strength = rng.uniform(0.15, 0.5)
    image[mask] = (1 - strength) * image[mask] + strength * np.array([0.25, 0.18, 0.1])
    return mask


def _paint_hole(image: np.ndarray, part: _Part, rng: np.random.Generator) -> np.ndarray:
    (cx, cy), radius = part.point_on_ring(rng), rng.uniform(0.02, 0.045) * part.size
    rim = _draw_mask(part.size, lambda draw: draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1))
    inner = radius * 0.75
    hole = _draw_mask(part.size, lambda draw: draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=1))
    image[rim] = np.clip(image[rim] + rng.uniform(0.03, 0.1), 0, 1)
    image[hole] *= rng.uniform(0.45, 0.8)
    return rim


def _draw_mask(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    """Command line entry: write the demo dataset and print its category folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder that receives the category folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default="demo")
    parser.add_argument("--image-size", type=int, default=128)
    arguments = parser.parse_args()
    print(make_demo_dataset(arguments.root, arguments.seed, arguments.category, arguments.image_size))


if __name__ == "__main__":
    main()
