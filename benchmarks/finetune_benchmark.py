"""Fine-tuning and phase-2 throughput of APC per numeric configuration, with ratios to today's float32 path.

Everything runs in one process on the same inputs and initial weights:

1. Throughput. For each configuration (``fp32``: float32, contiguous tensors, the path before this
   benchmark existed; ``bf16``: bfloat16 autocast; ``channels-last``; ``bf16+channels-last``;
   optionally ``bf16+channels-last+compile``) the script times ``--steps`` fine-tuning steps (forward
   through encoder, decoder and all three heads, APC's loss, backward, AdamW) on a batch of
   ``--batch-size`` images, and the phase-2 embedding (encoder to the deepest memory-bank stage, 3x3
   pooling, joining the stages) of the same batch, which always runs in float32. Images per second,
   the ratio to ``fp32`` and the peak growth of the resident set are printed. The inputs are random
   normalised images with random masks: the speed of a convolution does not depend on pixel values.
2. Accuracy. For ``fp32`` and the configuration that the model's defaults pick on this machine,
   APC is trained through anomalib's ``Engine`` on MPDD metal_plate (10 real anomalies moved to
   training, same split, weights and seeds for both) and tested; image and pixel AUROC are printed
   per seed, as mean and standard deviation, and as paired differences.

Run::

    python benchmarks/finetune_benchmark.py [--image-size 256] [--backbone resnet50] [--steps 4] \
        [--compile] [--accuracy-seeds 0 1 2] [--accuracy-image-size 128] [--accuracy-epochs 3]

``--accuracy-seeds`` with no value skips the accuracy part.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from coreset_benchmark import PeakRssGrowth, return_freed_memory_to_os
from measurements import add_json_option, write_json

from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.precision import finetune_autocast, full_precision, resolve_finetune_precision

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mpdd"


@dataclass(frozen=True)
class Configuration:
    """One way of running the fine-tuning step."""

    name: str
    precision: str
    channels_last: bool
    compile: bool = False


CONFIGURATIONS = (
    Configuration("fp32", "32", channels_last=False),
    Configuration("bf16", "bf16-mixed", channels_last=False),
    Configuration("channels-last", "32", channels_last=True),
    Configuration("bf16+channels-last", "bf16-mixed", channels_last=True),
)
COMPILED = Configuration("bf16+channels-last+compile", "bf16-mixed", channels_last=True, compile=True)


@dataclass
class Throughput:
    """Measured speed of one configuration."""

    finetune_images_per_second: float
    embedding_images_per_second: float
    peak_mib: float
    final_loss: float


def build_model(backbone: str, image_size: int, seed: int, **kwargs: object) -> AnomalousPatchCore:
    """APC with random initial weights drawn from ``seed`` (identical for every configuration)."""
    torch.manual_seed(seed)
    return AnomalousPatchCore(
        backbone=backbone,
        pre_trained=False,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(image_size, image_size)),
        visualizer=False,
        **kwargs,
    )


def timed(function: Callable[[], object], repeats: int) -> float:
    """Seconds per call of ``function`` after one untimed warm-up call."""
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def measure(configuration: Configuration, args: argparse.Namespace, initial_state: dict) -> Throughput:
    """Fine-tuning and embedding speed of ``configuration``, starting from ``initial_state``."""
    model = build_model(args.backbone, args.image_size, seed=0)
    model.load_state_dict(initial_state)
    network = model.model
    memory_format = torch.channels_last if configuration.channels_last else torch.contiguous_format
    network.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    images = images.contiguous(memory_format=memory_format)
    labels = (torch.arange(args.batch_size) % 2).float()
    masks = (torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=generator) > 0.9).float()
    masks *= labels.view(-1, 1, 1, 1)
    optimizer = torch.optim.AdamW(network.parameters(), lr=model.learning_rate, weight_decay=model.weight_decay)
    forward = torch.compile(network.finetune_forward) if configuration.compile else network.finetune_forward
    device = torch.device("cpu")
    losses: list[float] = []

    def finetune_step() -> None:
        with finetune_autocast(configuration.precision, device):
            total = model.loss(forward(images), images=images, labels=labels, masks=masks)["total"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))

    def embedding_step() -> None:
        with full_precision(device):
            network.patch_embeddings(images)

    return_freed_memory_to_os()
    network.train()
    with PeakRssGrowth() as memory:
        finetune_seconds = timed(finetune_step, args.steps)
    network.eval()
    embedding_seconds = timed(embedding_step, args.steps)
    return Throughput(
        finetune_images_per_second=args.batch_size / finetune_seconds,
        embedding_images_per_second=args.batch_size / embedding_seconds,
        peak_mib=memory.growth_bytes / 2**20,
        final_loss=losses[-1],
    )


def print_throughput(results: dict[str, Throughput], args: argparse.Namespace) -> None:
    """The throughput table, ratios against ``fp32``."""
    reference = results["fp32"]
    print(f"\n## Throughput: {args.backbone}, {args.image_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps\n")
    print("| configuration | fine-tuning img/s | ratio | phase-2 embedding img/s | ratio | peak RSS growth | loss |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {result.finetune_images_per_second:.2f} "
            f"| {result.finetune_images_per_second / reference.finetune_images_per_second:.2f}x "
            f"| {result.embedding_images_per_second:.2f} "
            f"| {result.embedding_images_per_second / reference.embedding_images_per_second:.2f}x "
            f"| {result.peak_mib:.0f} MiB | {result.final_loss:.3f} |"
        )


def train_and_test(args: argparse.Namespace, seed: int, precision: str, channels_last: bool) -> dict[str, float]:
    """Image and pixel AUROC of APC trained on MPDD metal_plate with the given numeric configuration."""
    from anomalib.engine import Engine

    from anomalib_apc.data import SupervisedMVTecAD

    datamodule = SupervisedMVTecAD(root=args.root, category=args.category, num_anomalies=10, seed=seed,
                                   train_batch_size=args.batch_size, eval_batch_size=16, num_workers=2)
    model = build_model(args.backbone, args.accuracy_image_size, seed=seed, finetune_epochs=args.accuracy_epochs,
                        finetune_precision=precision, channels_last=channels_last)
    engine = Engine(default_root_dir=args.output / f"{precision}-{channels_last}-seed{seed}", logger=False,
                    accelerator="cpu", enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    (metrics,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    return {"image_AUROC": metrics["image_AUROC"], "pixel_AUROC": metrics["pixel_AUROC"], "fit_seconds": fit_seconds}


def print_accuracy(runs: dict[str, list[dict[str, float]]], seeds: list[int]) -> None:
    """Per-seed metrics, mean ± std and the paired differences against ``fp32``."""
    print(f"\n## Accuracy on MPDD metal_plate, seeds {seeds}\n")
    print("| configuration | image AUROC | pixel AUROC | fit (s) |")
    print("|---|---|---|---|")
    for name, metrics in runs.items():
        cells = []
        for key in ("image_AUROC", "pixel_AUROC", "fit_seconds"):
            values = [run[key] * (100 if key != "fit_seconds" else 1) for run in metrics]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    reference = runs["fp32"]
    for name, metrics in runs.items():
        if name == "fp32":
            continue
        for key in ("image_AUROC", "pixel_AUROC"):
            differences = [100 * (run[key] - base[key]) for run, base in zip(metrics, reference, strict=True)]
            print(f"paired {name} - fp32, {key}: " + ", ".join(f"{d:+.2f}" for d in differences)
                  + f" (mean {statistics.mean(differences):+.2f})")


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run the throughput part, then the accuracy part."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the fastest configuration")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", default="metal_plate")
    parser.add_argument("--accuracy-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--accuracy-image-size", type=int, default=128)
    parser.add_argument("--accuracy-epochs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("results/finetune_benchmark"))
    add_json_option(parser)
    args = parser.parse_args(argv)

    initial_state = build_model(args.backbone, args.image_size, seed=0).state_dict()
    configurations = (*CONFIGURATIONS, COMPILED) if args.compile else CONFIGURATIONS
    results = {}
    for configuration in configurations:
        results[configuration.name] = measure(configuration, args, initial_state)
        print(f"{configuration.name}: {results[configuration.name]}", file=sys.stderr, flush=True)
    print_throughput(results, args)
    measured: dict = {"throughput": {name: asdict(result) for name, result in results.items()}}
    write_json(args.json, measured)

    if not args.accuracy_seeds:
        return
    default = build_model(args.backbone, args.accuracy_image_size, seed=0)
    chosen_precision = resolve_finetune_precision(default.finetune_precision, torch.device("cpu"))
    chosen = f"default ({chosen_precision}, channels_last={default.channels_last})"
    runs: dict[str, list[dict[str, float]]] = {"fp32": [], chosen: []}
    for seed in args.accuracy_seeds:
        runs["fp32"].append(train_and_test(args, seed, "32", channels_last=False))
        runs[chosen].append(train_and_test(args, seed, chosen_precision, default.channels_last))
        print(f"seed {seed}: fp32 {runs['fp32'][-1]}, default {runs[chosen][-1]}", file=sys.stderr, flush=True)
    print_accuracy(runs, args.accuracy_seeds)
    measured["accuracy"] = {"seeds": args.accuracy_seeds, "default": chosen, "runs": runs}
    write_json(args.json, measured)


if __name__ == "__main__":
    main()
