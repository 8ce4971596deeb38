"""Where phase 2 (memory-bank construction) spends its time: APC vs anomalib's Patchcore, same process.

Both models embed the same normal training images (MPDD metal_plate by default: 54 images) with a
randomly initialised ResNet-50 (``--backbone``) at 256 px, and subsample the same number of patches. The phase is cut
into its steps:

- ``load``: reading, decoding and pre-processing the images (the dataloader and the pre-processor),
- ``extract``: the CNN up to the deepest memory-bank stage,
- ``aggregate``: 3x3 local averaging, upsampling, concatenation and the reshape to patch rows,
- ``collect``: joining the per-batch patch rows into one matrix,
- ``sample``: the random projection and the k-center-greedy coreset.

Patchcore's steps are timed on its own modules (``feature_extractor``, ``feature_pooler``,
``generate_embedding``, ``reshape_embedding``, ``torch.vstack`` and ``KCenterGreedy``, as its
``subsample_embedding`` does); APC's on ``AnomalousPatchCoreModel`` and ``FastKCenterGreedy``. The
coreset indices of both samplers are asserted identical (Patchcore's extractor gets APC's random encoder
weights, as in the benchmark, so both embed the same features). Each model embeds one batch untimed first. Run::

    python benchmarks/phase2_profile.py [--root ../shared/datasets/mpdd] [--category metal_plate] \
        [--image-size 256] [--ratios 0.1 0.01]
"""

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from anomalib.models import Patchcore
from anomalib.models.components.sampling import KCenterGreedy
from measurements import add_json_option, write_json

from anomalib_apc.benchmark.models import copy_initial_weights
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.normal_images import normal_training_dataloader
from anomalib_apc.sampling import FastKCenterGreedy, concatenate_releasing, seeded_global_rngs

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mpdd"
STEPS = ("load", "extract", "aggregate", "collect", "sample")


class StepTimer:
    """Accumulates wall time per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start


def embed(model: torch.nn.Module, batches: list[torch.Tensor], timer: StepTimer) -> list[torch.Tensor]:
    """Extract and aggregate patch rows batch by batch (the code path shared by both models)."""
    rows = []
    with torch.no_grad():
        for images in batches:
            with timer.step("extract"):
                features = model.feature_extractor(images)
            with timer.step("aggregate"):
                pooled = {layer: model.feature_pooler(feature) for layer, feature in features.items()}
                rows.append(model.reshape_embedding(model.generate_embedding(pooled)))
    return rows


def load_batches(datamodule: SupervisedMVTecAD, transform: Callable, timer: StepTimer) -> list[torch.Tensor]:
    """Read the normal training images through the datamodule and pre-process them."""
    with timer.step("load"):
        return [transform(batch.image) for batch in normal_training_dataloader(datamodule)]


def profile(args: argparse.Namespace, ratio: float) -> dict:
    """Time both phase-2 pipelines for one coreset ratio, print the table and return what it shows."""
    size = (args.image_size, args.image_size)
    datamodule = SupervisedMVTecAD(root=args.root, category=args.category, num_anomalies=0, eval_batch_size=8,
                                   num_workers=0, seed=0)
    datamodule.setup()
    timers = {"anomalib Patchcore": StepTimer(), "APC": StepTimer()}

    torch.manual_seed(0)
    patchcore = Patchcore(backbone=args.backbone, pre_trained=False,
                          pre_processor=Patchcore.configure_pre_processor(size))
    apc = AnomalousPatchCore(backbone=args.backbone, pre_trained=False,
                             pre_processor=AnomalousPatchCore.configure_pre_processor(size))
    copy_initial_weights(apc, patchcore)
    timer = timers["anomalib Patchcore"]
    batches = load_batches(datamodule, patchcore.pre_processor.transform, timer)
    embed(patchcore.model.eval(), batches[:1], StepTimer())  # warm-up: first calls allocate and pick kernels
    rows = embed(patchcore.model, batches, timer)
    with timer.step("collect"):
        embedding = torch.vstack(rows)
    del rows
    with timer.step("sample"):
        with seeded_global_rngs(args.seed):
            reference_indices = KCenterGreedy(embedding, ratio).select_coreset_idxs()
    del embedding

    timer = timers["APC"]
    batches = load_batches(datamodule, apc.pre_processor.transform, timer)
    embed(apc.model.eval(), batches[:1], StepTimer())
    rows = embed(apc.model, batches, timer)
    with timer.step("collect"):
        embedding = concatenate_releasing(rows)
    with timer.step("sample"):
        indices = FastKCenterGreedy(embedding, ratio, seed=args.seed).select_coreset_idxs()
    if indices != reference_indices:
        msg = "FastKCenterGreedy chose other patches than KCenterGreedy"
        raise AssertionError(msg)

    normal_images = len(normal_training_dataloader(datamodule).dataset)
    print(f"\n{args.category}: {normal_images} normal images, "
          f"{embedding.shape[0]} x {embedding.shape[1]} patches, {args.image_size} px, coreset {ratio:.0%} "
          f"({len(indices)} patches, identical indices)")
    print(f"| step | {' | '.join(timers)} | ratio |")
    print("|---|---|---|---|")
    seconds = {}
    for name in (*STEPS, "total"):
        base, ours = (sum(t.seconds.values()) if name == "total" else t.seconds[name] for t in timers.values())
        print(f"| {name} | {base:.2f} s | {ours:.2f} s | {base / ours:.2f}x |")
        seconds[name] = {"anomalib": base, "ours": ours}
    return {
        "category": args.category, "normal_images": normal_images, "patches": list(embedding.shape), "ratio": ratio,
        "coreset_size": len(indices), "identical_indices": True, "seconds": seconds,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (the command line by default) and profile every requested coreset ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", default="metal_plate")
    parser.add_argument("--backbone", default="resnet50", help="timm CNN of both models (randomly initialised)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args(argv)
    write_json(args.json, [profile(args, ratio) for ratio in args.ratios])


if __name__ == "__main__":
    main()
