"""Accuracy of APC and Patchcore with exact vs chunked memory banks, on the same features, in one process.

For each category and seed the script builds the benchmark's two models (same split, initial weights
and coreset seed as ``anomalib-apc benchmark``) with the exact greedy, fits and tests them, then:

- APC (chunked): APC's fine-tuned weights, a memory bank built by the chunked sampler from the same
  normal images (``derive_from_apc``, as the benchmark's derived rows), tested on the same images;
- Patchcore (chunked): anomalib's Patchcore on the same initial weights with the chunked sampler.

So each pair differs only in the coreset sampler. Printed per run: image AUROC, pixel AUROC, AUPRO,
bank rows and phase-2 seconds; per category the mean ± std over seeds and the paired differences
chunked - exact. For the first seed it also prints each APC bank's coverage radius: the largest
distance from any normal training patch to its nearest bank row (the quantity k-center minimises).

Example (the three real categories, 256 px, random ResNet-50, 3 seeds)::

    python benchmarks/coreset_accuracy_benchmark.py ../shared/datasets/mpdd/metal_plate \
        ../shared/datasets/bsdata/ball_screw_drive ../shared/datasets/deeppcb/pcb --seeds 0 1 2
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch import seed_everything
from measurements import add_json_option, write_json

from anomalib_apc.benchmark.data import CategoryData, make_datamodule
from anomalib_apc.benchmark.engines import engine, fit_and_test
from anomalib_apc.benchmark.finetuning_reuse import derive_from_apc
from anomalib_apc.benchmark.meter import RunMeter
from anomalib_apc.benchmark.models import build_models, resolve_initialisation
from anomalib_apc.benchmark.rows import plan_rows
from anomalib_apc.benchmark.settings import APC, PATCHCORE, BenchmarkSettings
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.normal_images import normal_training_dataloader

METRICS = {"image AUROC": "image_AUROC", "pixel AUROC": "pixel_AUROC", "AUPRO": "pixel_AUPRO"}


def coverage_radius(model: AnomalousPatchCore, datamodule: object) -> float:
    """Largest distance from any normal training patch (the model's embedding) to its nearest bank row."""
    bank = model.model.memory_bank
    transform = model.pre_processor.transform
    radius = 0.0
    model.eval()
    with torch.no_grad():
        for batch in normal_training_dataloader(datamodule):
            patches = model.model.patch_embeddings(transform(batch.image))
            for block in patches.split(4096):
                radius = max(radius, float(torch.cdist(block, bank).min(dim=1).values.max()))
    return radius


def run_split(settings: BenchmarkSettings, data: CategoryData, seed: int, radius: bool) -> dict[str, dict]:
    """The four rows of one category and seed: {row: metrics + bank rows + phase-2 seconds (+ radius)}."""
    initialisation = resolve_initialisation(settings)
    chunked_settings = replace(settings, coreset_sampler="chunked")
    seed_everything(seed, workers=True)
    rows = plan_rows(settings)
    exact_models = build_models(rows, settings, initialisation, seed)
    exact_models[PATCHCORE].fast_coreset = True  # anomalib's indices, several times faster
    chunked_models = build_models(rows, chunked_settings, initialisation, seed)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, models in (("exact", exact_models), ("chunked", chunked_models)):
            for name in (PATCHCORE, APC):
                seed_everything(seed, workers=True)
                datamodule = make_datamodule(settings, data, seed)
                meter = RunMeter()
                model = models[name]
                started = time.perf_counter()
                if name == APC and label == "chunked":
                    derive_from_apc(model, exact_models[APC], datamodule)
                    phase2_s = time.perf_counter() - started
                    tester = engine(settings, Path(scratch), meter)
                    metrics = tester.test(model, datamodule=datamodule, verbose=False)[0]
                else:
                    metrics = fit_and_test(settings, model, datamodule, Path(scratch), meter)
                    phase2_s = meter.fit_s
                row = {key: 100 * float(metrics[metric]) for key, metric in METRICS.items()}
                row |= {"bank rows": len(model.model.memory_bank), "phase 2 s": phase2_s}
                if radius and name == APC:
                    row["radius"] = coverage_radius(model, datamodule)
                rows[f"{name} ({label})"] = row
                print(f"{data.category} seed {seed} {name} ({label}): "
                      + ", ".join(f"{key} {value:.2f}" for key, value in row.items()), flush=True)
    return rows


def summarise(category: str, runs: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Print mean ± std per row and the paired differences chunked - exact, per metric; return the differences."""
    print(f"\n### {category} ({len(runs)} seeds)\n")
    print("| row | " + " | ".join(METRICS) + " | phase 2 s |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for row in runs[0]:
        cells = [_mean_std([run[row][key] for run in runs]) for key in (*METRICS, "phase 2 s")]
        print(f"| {row} | " + " | ".join(cells) + " |")
    paired = {}
    for name in (PATCHCORE, APC):
        paired[name] = {
            key: [run[f"{name} (chunked)"][key] - run[f"{name} (exact)"][key] for run in runs] for key in METRICS
        }
        differences = [_mean_std(values) for values in paired[name].values()]
        print(f"| {name}: chunked - exact (paired) | " + " | ".join(differences) + " | |")
    return paired


def _mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, run every category x seed, print each run and the per-category tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="category folders in MVTec AD layout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="APC's fine-tuning epochs")
    parser.add_argument("--coreset-sampling-ratio", type=float, default=0.1)
    add_json_option(parser)
    args = parser.parse_args(argv)
    measured = {}
    for folder in args.folders:
        settings = BenchmarkSettings(
            dataset="mvtec-layout", root=folder, backbone=args.backbone, layers=tuple(args.layers),
            image_size=args.image_size, finetune_epochs=args.epochs, seeds=tuple(args.seeds), pre_trained=False,
            coreset_sampling_ratio=args.coreset_sampling_ratio, coreset_sampler="exact",
        ).resolved()
        data = CategoryData(folder.resolve().parent, folder.name)
        runs = [run_split(settings, data, seed, radius=seed == args.seeds[0]) for seed in args.seeds]
        measured[folder.name] = {"seeds": args.seeds, "runs": runs, "chunked_minus_exact": summarise(folder.name, runs)}
    write_json(args.json, measured)


if __name__ == "__main__":
    main()
