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
  whose defect probability weights the map, and the bundle's graph a second output; ``bundle without
  fusion`` is the same model exported without it (a graph that stops at the deepest memory-bank
  stage), which gives the cost of the fusion.
- with ``--compact-index``: ``bundle + <index>``, the FP32 bundle with a compact approximate index.
- with ``--int8``: ``anomalib openvino int8`` (anomalib's export with nncf post-training quantisation,
  ``CompressionType.INT8_PTQ``, calibrated on the datamodule's validation images as anomalib does),
  ``bundle int8`` (nncf calibrated on the normal training images, memory bank recomputed by the
  quantised graph), ``bundle int8, float bank`` (the control: the float model's memory bank searched
  with INT8 queries) and ``bundle int8 + <index>`` (the same with a compact approximate index), and
  ``--int8-acq`` adds ``bundle int8-acq`` (accuracy control against the labelled test images).

With ``--category-dir`` and ``--accuracy``, every contestant also scores every test image of the
category: image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) against the ground truth, and the share
of labels equal to the FP32 bundle's (the reference: its parity with the PyTorch model is printed),
and every contestant with a compact index is compared with exact search over its own memory bank on
every test image's patches: recall@1, distance errors, and how far raw image scores move.

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
    python benchmarks/deploy_benchmark.py --category-dir ../shared/datasets/mpdd/metal_plate --int8 --accuracy
"""

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import openvino as ov
import torch
from anomalib.data import ImageBatch, InferenceBatch, MVTecAD
from anomalib.deploy import CompressionType
from anomalib.metrics.aupro import _AUPRO
from measurements import add_json_option, write_json
from torchmetrics.classification import BinaryAUROC
from torchvision.transforms.v2 import Resize
from torchvision.transforms.v2.functional import resize
from tqdm import tqdm

from anomalib_apc.data import make_demo_dataset
from anomalib_apc.data.mvtecad import mvtec_samples
from anomalib_apc.deploy import ApcInferencer, compare_with_model, export_bundle, read_metadata
from anomalib_apc.deploy.images import list_image_files, read_image_file
from anomalib_apc.deploy.inferencer import graph_input
from anomalib_apc.deploy.metadata import GRAPH_OUTPUT
from anomalib_apc.deploy.options import APPROXIMATE_INDEX_TYPES
from anomalib_apc.deploy.search import BoundedExactSearch
from anomalib_apc.deploy.search_export import measure_recall
from anomalib_apc.models import AnomalousPatchCore

logger = logging.getLogger("deploy_benchmark")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    parser.add_argument("--init-weights", type=Path, help="local checkpoint of the backbone (default: random weights)")
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
    parser.add_argument("--int8", action="store_true", help="add the INT8 contestants (needs nncf)")
    parser.add_argument("--int8-acq", action="store_true", help="add the accuracy-controlled INT8 bundle")
    parser.add_argument("--compact-index", choices=APPROXIMATE_INDEX_TYPES, nargs="+", default=[],
                        help="compact indexes: a 'bundle + index' contestant each, 'bundle int8 + index' with --int8")
    parser.add_argument("--calibration-images", type=int, default=300,
                        help="normal training images INT8 calibration reads at most (default 300)")
    parser.add_argument("--accuracy", action="store_true",
                        help="score every test image of --category-dir with every contestant (AUROC, AUPRO, labels)")
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


class Prediction(NamedTuple):
    """What every contestant returns for a batch: post-processed scores, anomaly maps ``(B, H, W)`` and labels."""

    score: torch.Tensor
    anomaly_map: torch.Tensor
    label: torch.Tensor


Contestant = Callable[[torch.Tensor], Prediction]


def run(args: argparse.Namespace, work_dir: Path) -> dict:
    """Time every contestant, print the tables and return what they show."""
    if args.accuracy and args.category_dir is None:
        msg = "--accuracy scores a category's test images: give --category-dir."
        raise SystemExit(msg)
    size = (args.image_size, args.image_size)
    model = AnomalousPatchCore(
        backbone=args.backbone, layers=args.layers, pre_trained=False, init_weights=args.init_weights,
        tasks=("segmentation",) if args.segmentation_fusion else (), finetune_epochs=0, visualizer=False,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=size),
    ).eval()
    # set after construction: the model refuses an untrained segmentation head, which times like a trained one
    model.model.segmentation_fusion = args.segmentation_fusion
    train_images, test_images = load_images(args, work_dir)
    fill_memory_bank(model, train_images, args)
    calibrate_post_processor(model, test_images)

    started = time.perf_counter()
    bundle = export_bundle(model, work_dir / "bundle")
    logger.info("Bundle export: %.1f s.", time.perf_counter() - started)
    contestants: dict[str, Contestant] = {"torch": lambda images: from_inference_batch(model(images))}
    if not args.skip_anomalib_openvino:
        contestants["anomalib openvino"] = anomalib_openvino(model, work_dir, args, quantised=False)
        if args.int8:
            contestants["anomalib openvino int8"] = anomalib_openvino(model, work_dir, args, quantised=True)
    inferencer = ApcInferencer(bundle, num_threads=args.threads)
    contestants["bundle"] = bundle_contestant(inferencer)
    contestants["bundle brute force"] = bundle_contestant(
        ApcInferencer(bundle, num_threads=args.threads, search="brute_force"))
    if args.segmentation_fusion:  # the cost of the fusion: the same model exported without it
        model.model.segmentation_fusion = 0.0
        plain = export_bundle(model, work_dir / "bundle_without_fusion")
        model.model.segmentation_fusion = args.segmentation_fusion
        contestants["bundle without fusion"] = bundle_contestant(ApcInferencer(plain, num_threads=args.threads))
    compact: dict[str, ApcInferencer] = {}  # the contestants with an approximate index
    for name, options in compact_bundles(args) + int8_bundles(args):
        started = time.perf_counter()
        path = export_bundle(model, work_dir / name.replace(" ", "_"), **options)
        metadata = read_metadata(path)
        logger.info("%s export: %.1f s; memory bank from the %s; index measured at export: %s.", name,
                    time.perf_counter() - started, metadata.provenance["memory_bank"]["source"],
                    metadata.approximate_search)
        contestant_inferencer = ApcInferencer(path, num_threads=args.threads)
        contestants[name] = bundle_contestant(contestant_inferencer)
        if "index" in options:
            compact[name] = contestant_inferencer

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
    accuracy = search = None
    if args.accuracy:
        test_set = load_test_set(args)
        accuracy = measure_accuracy(contestants, test_set, args)
        search = {name: search_fidelity(inferencer, test_set.images) for name, inferencer in compact.items()}
        print_search_fidelity(search)
    return {
        "ms_per_image": {str(batch_size): row for batch_size, row in table.items()},
        "speed_up_vs_torch": {
            str(batch_size): {name: row["torch"] / value for name, value in row.items() if not isinstance(value, str)}
            for batch_size, row in table.items()
        },
        "bundle_batch_1_ms": breakdown,
        "parity": asdict(report),
        "accuracy": accuracy,
        "search_against_exact": search,
    }


def compact_bundles(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """The FP32 bundles with a compact index: names and ``export_bundle`` options."""
    return [(f"bundle + {index}", {"index": index, **index_measurement(args)}) for index in args.compact_index]


def index_measurement(args: argparse.Namespace) -> dict:
    """Have the export measure a compact index on the category's test images (not the memory bank's own)."""
    return {"validation_images": args.category_dir / "test"} if args.category_dir else {}


def int8_bundles(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """The INT8 bundles to export: names and ``export_bundle`` options."""
    if not (args.int8 or args.int8_acq):
        return []
    calibration = {"calibration_images": calibration_folder(args), "max_calibration_images": args.calibration_images}
    bundles = []
    if args.int8:
        bundles += [("bundle int8", {"precision": "int8", **calibration}),
                    ("bundle int8, float bank", {"precision": "int8", "recompute_memory_bank": False, **calibration})]
        bundles += [(f"bundle int8 + {index}", {"precision": "int8", "index": index, **calibration,
                                                **index_measurement(args)})
                    for index in args.compact_index]
    if args.int8_acq:
        bundles.append(("bundle int8-acq", {"precision": "int8-acq", "validation_images": args.category_dir / "test",
                                            **calibration}))
    return bundles


def calibration_folder(args: argparse.Namespace) -> Path:
    """The normal training images: those the memory bank comes from."""
    if args.category_dir is None:
        msg = "INT8 contestants calibrate on a category's normal training images: give --category-dir."
        raise SystemExit(msg)
    return args.category_dir / "train" / "good"


def from_inference_batch(batch: InferenceBatch | ImageBatch) -> Prediction:
    count = len(batch.pred_score)
    return Prediction(batch.pred_score.reshape(-1), batch.anomaly_map.reshape(count, *batch.anomaly_map.shape[-2:]),
                      batch.pred_label.reshape(-1))


def bundle_contestant(inferencer: ApcInferencer) -> Contestant:
    return lambda images: from_inference_batch(inferencer.predict(images))


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
        # as export_bundle reads calibration images, so that INT8 bundles find the memory bank's patches among them
        size = [args.image_size, args.image_size]
        return torch.stack([resize(read_image_file(f, size=tuple(size)), size, antialias=True) for f in files])

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


def anomalib_openvino(
    model: AnomalousPatchCore, work_dir: Path, args: argparse.Namespace, quantised: bool,
) -> Contestant:
    """anomalib's export of the model (``model.to_openvino``), compiled for the CPU; INT8 by anomalib's nncf path."""
    started = time.perf_counter()
    options = {}
    if quantised:
        category = calibration_folder(args).parent.parent
        size = (args.image_size, args.image_size)
        options = {"compression_type": CompressionType.INT8_PTQ,
                   "datamodule": MVTecAD(root=category.parent, category=category.name, eval_batch_size=1,
                                         num_workers=0, val_augmentations=Resize(size))}
    path = model.to_openvino(work_dir / ("anomalib_int8" if quantised else "anomalib_export"),
                             onnx_kwargs={"verbose": False}, **options)
    logger.info("anomalib OpenVINO export%s: %.1f s (%s).", " (INT8)" if quantised else "",
                time.perf_counter() - started, path)
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    if not quantised:  # float32 arithmetic, as the FP32 bundle (the CPU plugin would pick bfloat16 on this CPU)
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(path), "CPU", config)
    logger.info("anomalib OpenVINO graph input: %s.", compiled.input(0).get_partial_shape())

    def predict(images: torch.Tensor) -> Prediction:
        outputs = compiled(images.numpy())
        named = {output.get_any_name(): torch.from_numpy(outputs[output]) for output in compiled.outputs}
        maps = named["anomaly_map"].reshape(len(images), *images.shape[-2:])
        return Prediction(named["pred_score"].reshape(-1), maps, named["pred_label"].reshape(-1))

    return predict


class TestSet(NamedTuple):
    """Every test image of a category at the model's input size, its ground-truth mask and label."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor


def load_test_set(args: argparse.Namespace) -> TestSet:
    samples = mvtec_samples(args.category_dir, "--category-dir")
    samples = samples[samples.split == "test"]
    size = [args.image_size, args.image_size]
    images = torch.stack([resize(read_image_file(Path(path), size=tuple(size)), size, antialias=True)
                          for path in samples.image_path])
    masks = torch.stack([
        torch.zeros(size, dtype=torch.bool) if mask is None else
        torch.nn.functional.interpolate(read_image_file(Path(mask))[:1][None], size=size, mode="nearest")[0, 0] > 0.5
        for mask in samples.mask_path
    ])
    return TestSet(images, masks, torch.tensor(samples.label_index.to_numpy()))


def measure_accuracy(
    contestants: dict[str, Contestant], test_set: TestSet, args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """Image AUROC, pixel AUROC, AUPRO of every contestant on every test image, and label agreement with ``bundle``."""
    images, masks, labels = test_set
    predictions = {}
    for name, contestant in contestants.items():
        if name == "bundle brute force":  # the same results as "bundle", more slowly
            continue
        started = time.perf_counter()
        with torch.no_grad():
            parts = [contestant(batch) for batch in tqdm(images.split(8), desc=f"Accuracy: {name}", unit="batch")]
        predictions[name] = Prediction(*(torch.cat(field) for field in zip(*parts, strict=True)))
        logger.info("%s: %d test images in %.0f s.", name, len(images), time.perf_counter() - started)
    reference = predictions["bundle"].label
    results = {}
    for name, prediction in predictions.items():
        aupro = _AUPRO(fpr_limit=0.3)
        aupro.update(prediction.anomaly_map, masks.int())
        results[name] = {
            "image_auroc": 100 * float(BinaryAUROC()(prediction.score, labels)),
            "pixel_auroc": 100 * float(BinaryAUROC()(prediction.anomaly_map.flatten(), masks.flatten().int())),
            "aupro": 100 * float(aupro.compute()),
            "labels_equal_to_fp32_bundle": 100 * float((prediction.label == reference).float().mean()),
        }
    print(f"\nAccuracy on all {len(images)} test images of {args.category_dir} (labels against the FP32 bundle):")
    print(f"{'':<28}{'image AUROC':>12}{'pixel AUROC':>12}{'AUPRO':>8}{'labels =':>10}")
    for name, row in results.items():
        print(f"{name:<28}{row['image_auroc']:>12.2f}{row['pixel_auroc']:>12.2f}{row['aupro']:>8.2f}"
              f"{row['labels_equal_to_fp32_bundle']:>9.1f}%")
    return results


def search_fidelity(inferencer: ApcInferencer, images: torch.Tensor) -> dict[str, float]:
    """A bundle's approximate search against exact search over the same bank, on every test image.

    The patches are the bundle's own graph's; recall@1 and distance errors per patch (as the export
    measures them on its sample), and the largest relative change of a raw image score: what a
    miss does to the number a threshold decides on.
    """
    exact = ApcInferencer(inferencer.bundle, num_threads=inferencer.num_threads, search="exact")
    approximate_scores: list[torch.Tensor] = []
    exact_scores: list[torch.Tensor] = []

    def patch_rows() -> Iterator[np.ndarray]:
        """Each batch through the graph once: its raw image scores by both searches, then its rows for recall."""
        for batch in images.split(8):
            outputs = inferencer.graph(graph_input(inferencer.prepare(batch).model_inputs))
            approximate_scores.append(inferencer.score_graph_outputs(outputs).pred_score)
            exact_scores.append(exact.score_graph_outputs(outputs).pred_score)
            patches = outputs[GRAPH_OUTPUT]
            yield patches.reshape(-1, patches.shape[-1])

    with torch.no_grad():
        report = measure_recall(inferencer.search, exact.search, patch_rows(), "test image patches")
    found, nearest = torch.cat(approximate_scores), torch.cat(exact_scores)
    score_errors = (found - nearest).abs() / nearest.abs()
    return {
        "recall_at_1": report.recall_at_1,
        "mean_relative_distance_error": report.mean_relative_distance_error,
        "max_relative_distance_error": report.max_relative_distance_error,
        "max_relative_image_score_error": float(score_errors.max()),
        "images_with_image_score_error_over_1_percent": int((score_errors > 0.01).sum()),
        "patches": report.queries,
        "images": len(images),
    }


def print_search_fidelity(search: dict[str, dict[str, float]]) -> None:
    print("\nApproximate search against exact search over the same memory bank, every test image:")
    print(f"{'':<28}{'recall@1':>10}{'mean dist. err':>16}{'max dist. err':>15}{'max score err':>15}"
          f"{'images > 1 %':>14}")
    for name, row in search.items():
        print(f"{name:<28}{row['recall_at_1']:>10.4f}{row['mean_relative_distance_error']:>16.2e}"
              f"{row['max_relative_distance_error']:>15.2e}{row['max_relative_image_score_error']:>15.2e}"
              f"{row['images_with_image_score_error_over_1_percent']:>7d} of {row['images']}")


def time_contestants(
    contestants: dict[str, Contestant],
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
