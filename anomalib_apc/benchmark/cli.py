"""Arguments of ``anomalib-apc benchmark`` and the command itself.

Building the parser imports nothing heavy, so ``anomalib-apc --help`` stays instant; torch,
anomalib and the models are imported when the command runs.
"""

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomalib_apc.benchmark.runner import BenchmarkSettings

DEFAULTS_HELP = """\
defaults by dataset:
  demo            resnet18, 128 px, 5 fine-tuning epochs (finishes in a few minutes on a CPU)
  mvtecad/folder  resnet50, 256 px, 50 fine-tuning epochs (the paper's settings)

examples:
  anomalib-apc benchmark
  anomalib-apc benchmark --dataset mvtecad --root datasets/MVTecAD --category pill --category screw --seeds 0 1 2
  anomalib-apc benchmark --dataset folder --root ../shared/datasets/mpdd/metal_plate --backbone resnet50 \\
      --image-size 128 --finetune-epochs 3 --no-pretrained --seeds 0 1 2 --output results/mpdd
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = DEFAULTS_HELP
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=("demo", "mvtecad", "folder"),
        default="demo",
        help="demo: generated offline; mvtecad: categories under --root; folder: --root is one "
        "folder in MVTec AD layout (train/good, test/<type>, ground_truth/<type>) (default: demo)",
    )
    data.add_argument(
        "--root",
        type=Path,
        help="dataset root (mvtecad), dataset folder (folder) or where the demo dataset is written "
        "(demo; default OUTPUT/demo_dataset)",
    )
    data.add_argument(
        "--category",
        action="append",
        dest="categories",
        metavar="NAME",
        help="MVTec AD category, repeatable (default: all 15)",
    )
    data.add_argument(
        "--num-anomalies",
        type=int,
        default=10,
        help="anomalous images moved from test to APC's training, per category (default: 10)",
    )
    data.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="one run per seed; several give mean and spread (default: 0)",
    )

    models = parser.add_argument_group("models (identical for Patchcore and APC)")
    models.add_argument("--backbone", help="timm CNN name (default: by dataset, see below)")
    models.add_argument(
        "--layers",
        nargs="+",
        default=["layer2", "layer3"],
        metavar="LAYER",
        help="memory-bank stages (default: layer2 layer3)",
    )
    models.add_argument("--image-size", type=int, help="square input size in pixels (default: by dataset)")
    models.add_argument("--finetune-epochs", type=int, help="APC's fine-tuning epochs (default: by dataset)")
    weights = models.add_mutually_exclusive_group()
    weights.add_argument(
        "--no-pretrained",
        action="store_true",
        help="start both models from the same random weights (default: timm's ImageNet weights "
        "when they can be had, random with a notice otherwise)",
    )
    weights.add_argument(
        "--init-weights",
        type=Path,
        metavar="PATH",
        help="start both models from this torchvision, timm or MoCo v3 checkpoint",
    )
    models.add_argument(
        "--coreset-sampling-ratio",
        type=float,
        default=0.1,
        help="fraction of normal patches kept in the memory bank (default: 0.1)",
    )
    models.add_argument("--batch-size", type=int, default=16, help="APC's fine-tuning batch size (default: 16)")
    models.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="batch size of the memory-bank embedding and the test (default: 32)",
    )
    models.add_argument(
        "--patchcore-fast-coreset",
        action="store_true",
        help="add a row 'Patchcore (fast coreset)': anomalib's Patchcore with the FastKCenterGreedy "
        "sampler that APC uses, for a like-with-like memory-bank time",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output",
        type=Path,
        default=Path("results/benchmark"),
        metavar="DIR",
        help="folder for results.md/.csv/.json, figures/ and the runs (default: results/benchmark)",
    )
    run.add_argument("--device", default="auto", help="Lightning accelerator: auto, cpu, gpu, ... (default: auto)")
    run.add_argument("--num-workers", type=int, default=0, help="dataloader worker processes (default: 0)")


def settings_from_arguments(args: argparse.Namespace) -> "BenchmarkSettings":
    """The benchmark settings the parsed arguments ask for (profile defaults still unresolved)."""
    from anomalib_apc.benchmark.runner import BenchmarkSettings

    return BenchmarkSettings(
        dataset=args.dataset,
        root=args.root,
        categories=tuple(args.categories or ()),
        num_anomalies=args.num_anomalies,
        seeds=tuple(args.seeds),
        backbone=args.backbone,
        layers=tuple(args.layers),
        image_size=args.image_size,
        finetune_epochs=args.finetune_epochs,
        pre_trained=not args.no_pretrained,
        init_weights=args.init_weights,
        coreset_sampling_ratio=args.coreset_sampling_ratio,
        train_batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        patchcore_fast_coreset=args.patchcore_fast_coreset,
        output=args.output,
        device=args.device,
    )


def _hide_library_warnings() -> None:
    """Hide warnings a benchmark user cannot act on; before the imports, as timm and anomalib warn on import."""
    for message in (
        ".*but have no logger configured",  # the benchmark keeps no training curves
        ".*no `val_dataloader`. Skipping val loop",  # on purpose: the test is the only evaluation
        ".*returned `None`, this fit will run with no optimizer",  # Patchcore has nothing to optimise
        ".*module\\(s\\) in eval mode at the start of training",  # Patchcore's frozen extractor
        ".*treespec, LeafSpec",  # Lightning on a newer torch
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|anomalib)\.")  # their own deprecations


def _lower_library_loggers() -> None:
    """Hide Lightning's and anomalib's start-up lines; after the imports, as Lightning sets INFO when imported."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "anomalib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, writing the results after every category and seed; 1 if any run failed."""
    quiet = not getattr(args, "verbose", False)
    if quiet:
        _hide_library_warnings()
    from anomalib_apc.benchmark.report import write_report
    from anomalib_apc.benchmark.runner import run_benchmark

    if quiet:
        _lower_library_loggers()

    result = run_benchmark(settings_from_arguments(args), on_split_done=write_report)
    paths = write_report(result)
    print()
    print(paths["markdown"].read_text())
    print(
        f"Results: {paths['markdown']}, {paths['csv']}, {paths['json']}; figures in {paths['markdown'].parent / 'figures'}"
    )
    if result.failures:
        print(f"{len(result.failures)} run(s) failed (partial results kept):", file=sys.stderr)
        for failure in result.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0
