"""Peak memory (RSS) of scoring large images with ``predict_folder`` against reading them at full size.

``predict_folder`` reads each file straight to the model's input size (PIL reduces it while
decoding), so its batches hold small images only. The former path read every image of a batch at
full size as float32 (432 MB for 6000 x 6000 RGB) and resized them in the inferencer. Each path runs
in a fresh child process on the same bundle and files; the table gives the child's peak RSS
(``ru_maxrss``) and its wall time. The files are hard links to one generated image, so 100 of them
cost the disk one image.

Measured on a shared two-core machine (ResNet-18 bundle, 256 px input, batch size 8): 100 PNG
images, bounded: peak RSS 2,779 MB (1,311 MB after loading the bundle; the same peak for 3 images),
669 s; full size, 16 images (two batches; the peak is one batch's): 7,962 MB (1,248 MB after
loading), 150 s.

Example:
    python benchmarks/predict_memory.py                      # 100 PNG images of 6000 x 6000
    python benchmarks/predict_memory.py --images 10 --format jpg
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from measurements import add_json_option, write_json
from PIL import Image

MODES = ("bounded", "full-size")


def make_images(folder: Path, count: int, size: int, suffix: str) -> list[Path]:
    """``count`` hard links to one smooth RGB image with noise, ``size`` x ``size`` pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, size, dtype=np.float32)
    pixels = ramp[None, :, None] * np.array([1.0, 0.6, 0.3], dtype=np.float32) + ramp[:, None, None] * 0.2
    pixels = (pixels + rng.integers(0, 40, (size, size, 1))).clip(0, 255).astype(np.uint8)
    first = folder / f"image_000.{suffix}"
    Image.fromarray(pixels).save(first, **({"compress_level": 1} if suffix == "png" else {}))
    paths = [first]
    for number in range(1, count):
        path = folder / f"image_{number:03d}.{suffix}"
        os.link(first, path)
        paths.append(path)
    return paths


def make_bundle(folder: Path, image_size: int) -> Path:
    """A ResNet-18 bundle with a random memory bank (memory does not depend on the weights)."""
    from anomalib_apc.deploy import export_bundle
    from anomalib_apc.models import AnomalousPatchCore

    model = AnomalousPatchCore(
        backbone="resnet18", pre_trained=False, finetune_epochs=0, visualizer=False, post_processor=False,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(image_size, image_size)),
    ).eval()
    model.model.memory_bank = torch.randn(1000, 384, generator=torch.Generator().manual_seed(0))
    return export_bundle(model, folder)


def current_rss_mb() -> float:
    """The process's resident set now (Linux ``/proc``), in MB."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def child(mode: str, bundle: Path, images: Path, output: Path, batch_size: int) -> None:
    """Score the images one way and print ``rss_after_loading_mb peak_rss_mb seconds``."""
    from anomalib_apc.deploy import ApcInferencer, predict_folder
    from anomalib_apc.deploy.images import list_image_files, read_image_file

    inferencer = ApcInferencer(bundle)
    loaded = current_rss_mb()
    started = time.perf_counter()
    if mode == "bounded":
        predict_folder(inferencer, [images], output, batch_size=batch_size, show_progress=False)
    else:
        files = list_image_files([images])
        for start in range(0, len(files), batch_size):
            inferencer.predict([read_image_file(path) for path in files[start:start + batch_size]])
    seconds = time.perf_counter() - started
    print(f"{loaded:.0f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=6000, help="width and height of the images")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--image-size", type=int, default=256, help="the model's input size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.bundle, args.folder, args.folder.parent / "predictions", args.batch_size)
        return
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        make_images(work / "images", args.images, args.size, args.format)
        bundle = make_bundle(work / "bundle", args.image_size)
        print(f"{args.images} {args.format.upper()} images of {args.size} x {args.size}, model input "
              f"{args.image_size} px, batch size {args.batch_size}")
        measured = {}
        for mode in args.modes:
            result = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--bundle", str(bundle), "--folder", str(work / "images"),
                 "--batch-size", str(args.batch_size)],
                check=True, capture_output=True, text=True,
            )
            loaded, peak, seconds = result.stdout.split()[-3:]
            print(f"{mode:>9}: peak RSS {peak} MB ({loaded} MB after loading the bundle), {seconds} s")
            measured[mode] = {"rss_after_loading_mb": float(loaded), "peak_rss_mb": float(peak),
                              "seconds": float(seconds)}
    write_json(args.json, measured)


if __name__ == "__main__":
    main()
