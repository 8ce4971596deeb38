"""Time anomalib's ``KCenterGreedy`` against ``FastKCenterGreedy`` on the same features, in one process.

Both samplers run on the same feature tensor with the same seed (anomalib after
``torch.manual_seed(seed)`` and ``np.random.seed(seed)``, ours with ``seed=seed``), and the script
fails unless they select the same indices in the same order.

anomalib needs hours at n = 500k with a 10 % coreset, so ``--max-anomalib-seconds`` caps it: a
short probe measures anomalib's time per greedy step, both samplers then run only the first K steps
that fit in the budget (greedy selection is prefix-stable, so the first K indices must still match)
and their full-coreset times are extrapolated as projection time + (coreset size - 1) x measured
time per step. Such rows are marked "extrapolated" in the table.

Peak memory is the highest resident set size (psutil, sampled every 5 ms by a background thread)
during a sampler's ``select_coreset_idxs`` minus the resident set size just before it, after
glibc's ``malloc_trim`` returned what earlier runs freed; the input features are allocated before
either run and are not counted.

The ``load`` column is the 1-minute load average when the row finished: the timings are only
comparable between rows run on an otherwise idle machine (load close to the thread count).

Feature kinds: ``gaussian`` is ``torch.randn``; ``clustered`` imitates CNN patch features (non-
negative after a ReLU, grouped around a few hundred prototypes like textures and background, and
10 % exact duplicate rows like flat background patches, which makes exact distance ties common).

Example (anomalib's progress bars go to stderr):
    python benchmarks/coreset_benchmark.py --sizes 100000 500000 --ratios 0.01 0.1 \
        --max-anomalib-seconds 300 2>/dev/null
"""

import argparse
import ctypes
import ctypes.util
import gc
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
from anomalib.models.components.sampling import KCenterGreedy
from measurements import add_json_option, write_json

from anomalib_apc.sampling import FastKCenterGreedy

PROBE_STEPS = 10
"""Greedy steps anomalib runs to estimate its time per step before a capped run."""

RSS_SAMPLING_SECONDS = 0.005

WARM_UP_ROWS = 2000
"""Rows of a throw-away selection by both samplers, so that neither timed run pays for starting
thread pools or BLAS, nor has the memory they keep counted as its own."""


class TimedProjection(SparseRandomProjection):
    """anomalib's projection, unchanged, that also records the time spent fitting and projecting."""

    def __init__(self, eps: float) -> None:
        super().__init__(eps=eps)
        self.seconds = 0.0

    def fit(self, embedding: torch.Tensor) -> "TimedProjection":
        """Fit as anomalib does, timed."""
        start = time.perf_counter()
        super().fit(embedding)
        self.seconds += time.perf_counter() - start
        return self

    def transform(self, embedding: torch.Tensor) -> torch.Tensor:
        """Project as anomalib does, timed."""
        start = time.perf_counter()
        projected = super().transform(embedding)
        self.seconds += time.perf_counter() - start
        return projected


class PeakRssGrowth:
    """Context manager measuring how far the process's resident set grows above its level at entry.

    torch allocates outside Python's allocator, so tracemalloc cannot see it; a background thread
    samples the RSS instead, which can miss spikes shorter than the sampling period.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._finished = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._baseline = 0
        self._peak = 0
        self.growth_bytes = 0

    def _sample(self) -> None:
        while not self._finished.wait(RSS_SAMPLING_SECONDS):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakRssGrowth":
        self._baseline = self._peak = self._process.memory_info().rss
        self._sampler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._finished.set()
        self._sampler.join()
        self.growth_bytes = max(self._peak, self._process.memory_info().rss) - self._baseline


@dataclass
class Run:
    """One timed selection."""

    indices: list[int]
    seconds: float
    projection_seconds: float
    peak_bytes: int

    def seconds_per_step(self) -> float:
        """Greedy-loop time per selected index after the random first one."""
        return (self.seconds - self.projection_seconds) / max(1, len(self.indices) - 1)

    def extrapolated_seconds(self, coreset_size: int) -> float:
        """Projection plus ``coreset_size - 1`` greedy steps at the measured pace."""
        return self.projection_seconds + self.seconds_per_step() * (coreset_size - 1)


def return_freed_memory_to_os() -> None:
    """Make glibc hand freed heap memory back, so the RSS baseline of the next run is honest.

    Without it, memory a previous run freed stays in the process and the next run reuses it
    without growing the RSS, which would hide that run's peak.
    """
    gc.collect()
    libc_path = ctypes.util.find_library("c")
    if libc_path is not None and hasattr(ctypes.CDLL(libc_path), "malloc_trim"):
        ctypes.CDLL(libc_path).malloc_trim(0)


def run_selection(sampler: KCenterGreedy, steps: int) -> Run:
    """Time ``sampler.select_coreset_idxs()`` limited to its first ``steps`` indices."""
    sampler.model = TimedProjection(eps=sampler.model.eps)
    sampler.coreset_size = steps
    return_freed_memory_to_os()
    with PeakRssGrowth() as memory:
        start = time.perf_counter()
        indices = sampler.select_coreset_idxs()
        seconds = time.perf_counter() - start
    return Run(indices, seconds, sampler.model.seconds, memory.growth_bytes)


def run_anomalib(features: torch.Tensor, ratio: float, seed: int, steps: int) -> Run:
    """anomalib's sampler, seeded the way ``FastKCenterGreedy(seed=...)`` seeds itself."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return run_selection(KCenterGreedy(embedding=features, sampling_ratio=ratio), steps)


def run_fast(features: torch.Tensor, ratio: float, seed: int, steps: int) -> Run:
    """Our sampler with an explicit seed."""
    return run_selection(FastKCenterGreedy(embedding=features, sampling_ratio=ratio, seed=seed), steps)


def make_features(kind: str, rows: int, dim: int, seed: int) -> torch.Tensor:
    """Synthetic patch features (see the module docstring for the two kinds)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, dim, generator=generator)
    prototypes = torch.randn(256, dim, generator=generator)
    assignment = torch.randint(len(prototypes), (rows,), generator=generator)
    features = torch.randn(rows, dim, generator=generator).mul_(0.5).add_(prototypes[assignment]).relu_()
    duplicates = torch.randint(rows, (rows // 10,), generator=generator)
    features[torch.randint(rows, (rows // 10,), generator=generator)] = features[duplicates]
    return features


def greedy_steps_within(budget_seconds: float, features: torch.Tensor, ratio: float, seed: int) -> int:
    """How many indices anomalib selects within ``budget_seconds`` (at least a probe's worth)."""
    coreset_size = int(len(features) * ratio)
    probe = run_anomalib(features, ratio, seed, steps=min(coreset_size, PROBE_STEPS + 1))
    affordable = int((budget_seconds - probe.projection_seconds) / probe.seconds_per_step()) + 1
    return max(len(probe.indices), min(coreset_size, affordable))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (the command line by default), run every size x ratio pair and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000], help="numbers of patches n")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1], help="coreset sampling ratios")
    parser.add_argument("--dim", type=int, default=1536, help="feature dimension d before projection")
    parser.add_argument("--features", choices=["gaussian", "clustered"], default="gaussian")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-anomalib-seconds",
        type=float,
        default=None,
        help="time budget for anomalib per row; longer selections are run on a prefix and extrapolated",
    )
    add_json_option(parser)
    args = parser.parse_args(argv)

    measured = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, features={args.features}, d={args.dim}")
    header = (
        f"{'n':>7} {'ratio':>5} {'coreset':>7} {'steps':>6} | {'projection s':>12} | {'anomalib s':>10} {'ours s':>7}"
        f" {'speed-up':>8} | {'full anomalib s':>15} {'full ours s':>11} {'speed-up':>8} {'basis':>12}"
        f" | {'anomalib MiB':>12} {'ours MiB':>8} | {'load':>4} | same"
    )
    print(header)
    print("-" * len(header))
    warm_up = make_features(args.features, WARM_UP_ROWS, args.dim, args.seed)
    run_anomalib(warm_up, ratio=0.01, seed=args.seed, steps=PROBE_STEPS)
    run_fast(warm_up, ratio=0.01, seed=args.seed, steps=PROBE_STEPS)
    del warm_up
    for rows in args.sizes:
        features = make_features(args.features, rows, args.dim, args.seed)
        for ratio in args.ratios:
            coreset_size = int(rows * ratio)
            steps = coreset_size
            if args.max_anomalib_seconds is not None:
                steps = greedy_steps_within(args.max_anomalib_seconds, features, ratio, args.seed)
            anomalib_run = run_anomalib(features, ratio, args.seed, steps)
            fast_run = run_fast(features, ratio, args.seed, steps)
            identical = anomalib_run.indices == fast_run.indices
            full_anomalib = anomalib_run.extrapolated_seconds(coreset_size)
            full_fast = fast_run.extrapolated_seconds(coreset_size)
            print(
                f"{rows:>7} {ratio:>5.3f} {coreset_size:>7} {steps:>6}"
                f" | {anomalib_run.projection_seconds:>5.1f} / {fast_run.projection_seconds:>4.1f}"
                f" | {anomalib_run.seconds:>10.1f} {fast_run.seconds:>7.1f}"
                f" {anomalib_run.seconds / fast_run.seconds:>7.2f}x"
                f" | {full_anomalib:>15.0f} {full_fast:>11.0f} {full_anomalib / full_fast:>7.2f}x"
                f" {'measured' if steps == coreset_size else 'extrapolated':>12}"
                f" | {anomalib_run.peak_bytes / 2**20:>12.0f} {fast_run.peak_bytes / 2**20:>8.0f}"
                f" | {os.getloadavg()[0]:>4.1f} | {identical}",
                flush=True,
            )
            measured.append({
                "rows": rows, "ratio": ratio, "coreset_size": coreset_size, "steps": steps,
                "projection_s": {"anomalib": anomalib_run.projection_seconds, "ours": fast_run.projection_seconds},
                "selection_s": {"anomalib": anomalib_run.seconds, "ours": fast_run.seconds},
                "full_selection_s": {"anomalib": full_anomalib, "ours": full_fast},
                "extrapolated": steps != coreset_size,
                "peak_mib": {"anomalib": anomalib_run.peak_bytes / 2**20, "ours": fast_run.peak_bytes / 2**20},
                "identical_indices": identical,
            })  # fmt: skip
            if not identical:
                msg = f"n={rows}, ratio={ratio}: FastKCenterGreedy selected different indices than KCenterGreedy"
                raise AssertionError(msg)
        del features
    write_json(args.json, measured)


if __name__ == "__main__":
    main()
