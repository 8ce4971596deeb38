"""Per-image latency of the deployment bundle against the PyTorch model and anomalib's own OpenVINO export.

All run in one process on the same images (RGB in ``[0, 1]`` at the model's input size) and the same
model, each doing the whole job: pre-processing, CNN, nearest-neighbour search, re-weighting,
anomaly map, normalisation and labels.

- ``torch``: the Lightning module's forward (pre-processor, ``AnomalousPatchCoreModel``, post-processor),
  as anomalib's ``TorchInferencer`` runs it.
- ``anomalib openvino``: ``model.to_openvino`` (anomalib's standard export, search traced into the graph;
  batch-dynamic since ``AnomalousPatchCoreModel`` searches in one piece while exported).
- ``bundle``: ``ApcInferencer.predict`` on an FP32 bundle: OpenVINO CNN, exact faiss search with the
  lower bound of ``anomalib_apc.deploy.search``.
- ``bundle brute force``: the same bundle with ``search="brute_force"`` (faiss ``IndexFlatL2`` over every row).
- with ``--segmentation-fusion W``, the model has a segmentation head (untrained: the time is the same)
  whose defect probability weights the map, and the bundle its extra graph; ``bundle, map unfused``
  is that bundle with the extra graph left out, which gives the cost of the fusion.

Calls are interleaved (one call of each contestant per round), so that load from other processes
affects them alike; the table gives the median over rounds per image. The ``load`` line gives the
1-minute load average before and after: figures are only comparable on an otherwise idle machine.

Model and data: ResNet-50 (random initialisation: no weights can be downloaded here) at 256 px; the
memory bank (16,384 x 1,536 by default) is a uniform random choice among the patches of generated
demo images (``anomalib_apc.data.make_demo_dataset``), or ``--category-dir`` images in MVTec AD
layout, or structureless Gaussian rows with the features' mean and spread (``--memory-bank random``;
there the lower bound cannot settle anything and exact search falls back to brute force).

Example:
    python benchmarks/deploy_benchmark.py                       # ResNet-50, 256 px, 16,384 x 1,536
    python benchmarks/deploy_benchmark.py --backbone resnet18 --image-size 128 --memory-bank-size 2048 --rounds 3
    python benchmarks/deploy_benchmark.py --image-size 128 --memory-bank-size 4096 --segmentation-fusion 1
"""

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from measurements import add_json_option, write_json

from anomalib_apc.data import make_demo_dataset
from anomalib_apc.deploy import ApcInferencer, compare_with_model, export_bundle
from anomalib_apc.deploy.images import list_image_files, read_image_file
from anomalib_apc.deploy.search import BoundedExactSearch
from anomalib_apc.models import AnomalousPatchCore

logger = logging.getLogger("deploy_benchmark")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--memory-bank-size", type=int, default=16384)
    parser.add_argument("--memory-bank", choices=("real", "random"), default="real",
                        help="patches of training images, or Gaussian rows with their mean and spread")
    parser.add_argument("--category-dir", type=Path,
                        help="images in MVTec AD layout (train/good, test/*) instead of generated ones")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per contestant and batch size")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-anomalib-openvino", action="store_true",
                        help="leave out anomalib's export (slow to export)")
    parser.add_argument("--segmentation-fusion", type=float, default=0.0,
                        help="exponent of the segmentation head's probability in the map (0: PatchCore's map)")
    parser.add_argument("--work-dir", type=Path, help="where exports go (default: a temporary folder)")
    add_json_option(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        write_json(args.json, run(args, work_dir))


def run(args: argparse.Namespace, work_dir: Path) -> dict:
    """Time every contestant, print the tables and return what they show."""
    size = (args.image_size, args.image_size)
    model = AnomalousPatchCore(
        backbone=args.backbone, pre_trained=False, tasks=("segmentation",) if args.segmentation_fusion else (),
        finetune_epochs=0, visualizer=False, pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=size),
    ).eval()
    # set after construction: the model refuses an untrained segmentation head, which times like a trained one
    model.model.segmentation_fusion = args.segmentation_fusion
    train_images, test_images = load_images(args, work_dir)
    fill_memory_bank(model, train_images, args)
    calibrate_post_processor(model, test_images)

    started = time.perf_counter()
    bundle = export_bundle(model, work_dir / "bundle")
    logger.info("Bundle export: %.1f s.", time.perf_counter() - started)
    contestants: dict[str, Callable[[torch.Tensor], object]] = {"torch": model}
    if not args.skip_anomalib_openvino:
        contestants["anomalib openvino"] = anomalib_openvino(model, work_dir, args.threads)
    inferencer = ApcInferencer(bundle, num_threads=args.threads)
    contestants["bundle"] = inferencer.predict
    contestants["bundle brute force"] = ApcInferencer(bundle, num_threads=args.threads, search="brute_force").predict
    if args.segmentation_fusion:
        unfused = ApcInferencer(bundle, num_threads=args.threads)
        unfused.defect_graph = None
        contestants["bundle, map unfused"] = unfused.predict

    fusion = f", segmentation fusion {args.segmentation_fusion}" if args.segmentation_fusion else ""
    print(f"\n{args.backbone}{fusion}, {args.image_size} px, memory bank {model.model.memory_bank.shape[0]} x "
          f"{model.model.memory_bank.shape[1]} ({args.memory_bank}), {args.threads} threads, "
          f"load before {os.getloadavg()[0]:.2f}")
    table = {
        batch_size: time_contestants(contestants, test_images, batch_size, args.rounds)
        for batch_size in args.batch_sizes
    }
    print_table(table, list(contestants))
    print(f"load after {os.getloadavg()[0]:.2f}")
    breakdown = print_breakdown(inferencer, test_images[:1], args.rounds)
    report = compare_with_model(inferencer, model, test_images)
    print(f"Parity, bundle (FP32, exact) against torch: {report.summary()}; "
          f"normalised scores within {report.max_normalized_score_difference:.2e}.")
    return {
        "ms_per_image": {str(batch_size): row for batch_size, row in table.items()},
        "speed_up_vs_torch": {
            str(batch_size): {name: row["torch"] / value for name, value in row.items() if not isinstance(value, str)}
            for batch_size, row in table.items()
        },
        "bundle_batch_1_ms": breakdown,
        "parity": asdict(report),
    }


MIN_PARITY_IMAGES = 4
"""Test images for calibration and the parity check at least: with one, its score is the minimum, the maximum
and the median threshold at once, and float noise between bundle and model decides its label."""


def load_images(args: argparse.Namespace, work_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images (enough patches for the memory bank) and test images, RGB at the model's input size."""
    height, width = args.image_size // 8, args.image_size // 8  # layer2 of a ResNet
    needed_train = math.ceil(1.5 * args.memory_bank_size / (height * width))
    needed_test = max(*args.batch_sizes, MIN_PARITY_IMAGES)
    category_dir = args.category_dir or make_demo_dataset(
        work_dir / "data", image_size=args.image_size, num_train=needed_train, num_test_normal=needed_test // 2,
        num_per_defect_type=math.ceil(needed_test / 6),
    )
    train_files = list_image_files([category_dir / "train"])[:needed_train]
    test_files = list_image_files([category_dir / "test"])
    test_files = [test_files[i] for i in np.linspace(0, len(test_files) - 1, needed_test).round().astype(int)]

    def read(files: list[Path]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.interpolate(read_image_file(f)[None], size=(args.image_size,) * 2,
                                                            mode="bilinear", antialias=True)[0] for f in files])

    return read(train_files), read(test_files)


@torch.no_grad()
def fill_memory_bank(model: AnomalousPatchCore, images: torch.Tensor, args: argparse.Namespace) -> None:
    transform = model.pre_processor.transform
    patches = torch.cat([model.model.patch_embeddings(transform(batch)) for batch in images.split(8)])
    if len(patches) < args.memory_bank_size:
        msg = f"{len(patches)} training patches, fewer than the memory bank's {args.memory_bank_size}."
        raise ValueError(msg)
    generator = torch.Generator().manual_seed(0)
    if args.memory_bank == "real":
        bank = patches[torch.randperm(len(patches), generator=generator)[: args.memory_bank_size]]
    else:
        noise = torch.randn(args.memory_bank_size, patches.shape[1], generator=generator)
        bank = patches.mean(0) + noise * patches.std(0)
    model.model.memory_bank = bank.contiguous()


@torch.no_grad()
def calibrate_post_processor(model: AnomalousPatchCore, images: torch.Tensor) -> None:
    """Thresholds and min/max from the test images, as validation would set them, so labels exist."""
    raw = model.model(model.pre_processor.transform(images))
    post = model.post_processor
    post.image_min.fill_(raw.pred_score.min())
    post.image_max.fill_(raw.pred_score.max())
    # The interpolated median lies between two scores, so no score sits exactly on the threshold.
    post._image_threshold.fill_(raw.pred_score.quantile(0.5))
    post.pixel_min.fill_(raw.anomaly_map.min())
    post.pixel_max.fill_(raw.anomaly_map.max())
    post._pixel_threshold.fill_(raw.anomaly_map.median())


def anomalib_openvino(model: AnomalousPatchCore, work_dir: Path, threads: int) -> Callable[[torch.Tensor], object]:
    """anomalib's export of the model (``model.to_openvino``), compiled for the CPU."""
    started = time.perf_counter()
    path = model.to_openvino(work_dir / "anomalib_export", onnx_kwargs={"verbose": False})
    logger.info("anomalib OpenVINO export: %.1f s (%s).", time.perf_counter() - started, path)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    logger.info("anomalib OpenVINO graph input: %s.", compiled.input(0).get_partial_shape())
    return lambda images: compiled(images.numpy())


def time_contestants(
    contestants: dict[str, Callable[[torch.Tensor], object]],
    images: torch.Tensor,
    batch_size: int,
    rounds: int,
) -> dict[str, float | str]:
    """Median milliseconds per image of each contestant, or why it could not run."""
    batch = images[:batch_size].contiguous()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    refused: dict[str, str] = {}
    with torch.no_grad():
        for name, contestant in contestants.items():  # warm-up, and find out who refuses this batch size
            try:
                contestant(batch)
            except RuntimeError as error:
                refused[name] = str(error).splitlines()[0][:60]
        for _ in range(rounds):
            for name, contestant in contestants.items():
                if name in refused:
                    continue
                started = time.perf_counter()
                contestant(batch)
                times[name].append((time.perf_counter() - started) * 1000 / batch_size)
    return {name: refused.get(name) or statistics.median(times[name]) for name in contestants}


def print_table(table: dict[int, dict[str, float | str]], names: list[str]) -> None:
    print(f"\n{'ms per image':<22}" + "".join(f"{'batch ' + str(b):>14}{'x torch':>9}" for b in table))
    for name in names:
        cells = []
        for row in table.values():
            value, torch_ms = row[name], row["torch"]
            if isinstance(value, str):
                cells.append(f"{'refused':>14}{'':>9}")
            else:
                cells.append(f"{value:>14.1f}{torch_ms / value:>8.2f}x")
        print(f"{name:<22}" + "".join(cells))


def print_breakdown(inferencer: ApcInferencer, image: torch.Tensor, rounds: int) -> dict[str, float]:
    """Where the bundle's time goes for one image: print it and return the median ms per stage."""
    model_inputs = inferencer.prepare(image).model_inputs
    patches = inferencer.embed(model_inputs)
    rows = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]))
    stages = {
        "CNN (OpenVINO)": lambda: inferencer.embed(model_inputs),
        "search": lambda: inferencer.search.nearest(rows),
        "everything (predict)": lambda: inferencer.predict(image),
    }
    medians = {}
    for name, stage in stages.items():
        stage()
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            stage()
            samples.append((time.perf_counter() - started) * 1000)
        medians[name] = statistics.median(samples)
    search = inferencer.search
    settled = search.settled_fraction if isinstance(search, BoundedExactSearch) else 0.0
    print("Bundle at batch 1: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items())
          + f"; the bound settled {100 * settled:.1f} % of the patches, brute force the rest")
    return medians

if __name__ == "__main__":
    main()
