"""Time, memory and coverage of the chunked coreset sampler against the exact greedy, in one process.

For each size n x 1,536 and ratio the script makes synthetic patch features block by block (never a
second copy), in memory or, when they would take more than half the free memory, in a memory-mapped
temporary file (``PatchRowCollector("auto")``, phase 2's own storage), then:

- chunked: ``ChunkedKCenterGreedy`` projection + selection, timed in full;
- exact: ``FastKCenterGreedy`` (anomalib's indices, the fastest exact greedy here), timed in full up
  to ``--full-exact-max-rows`` rows, otherwise on a prefix of the greedy steps that fits
  ``--exact-budget`` seconds and extrapolated as projection + picks x time per step (greedy is
  prefix-stable, so the prefix is the real run's beginning);
- where the exact bank was built in full: the coverage radius (largest distance from any row to its
  nearest bank row) of both banks and of as many rows drawn at random (the control).

Memory is the peak growth of the process's anonymous resident memory (RSS minus file-backed pages,
sampled every 5 ms) during a sampler's run, above the features already in place: a memory-mapped
matrix's pages are file-backed and the kernel may drop them, so they are not counted against it.

Feature kinds as in ``coreset_benchmark.py``: ``clustered`` (non-negative, around 256 prototypes, 10 %
duplicate rows) or ``gaussian``.

Example (the table in docs/coreset.md)::

    python benchmarks/chunked_coreset_benchmark.py --sizes 100000 300000 1000000 3000000 --ratios 0.01 0.1
"""

import argparse
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psutil
import torch
from coreset_benchmark import return_freed_memory_to_os, run_fast
from measurements import add_json_option, write_json

from anomalib_apc.sampling import ChunkedKCenterGreedy, FastKCenterGreedy, PatchRowCollector

GENERATION_BLOCK_ROWS = 65_536
_T = TypeVar("_T")
RSS_SAMPLING_SECONDS = 0.005


class PeakAnonymousGrowth:
    """How far the process's anonymous resident memory (RSS minus file-backed pages) grows inside the block."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._baseline = self._peak = 0
        self.growth_bytes = 0

    def _anonymous(self) -> int:
        info = self._process.memory_info()
        return info.rss - info.shared

    def _sample(self) -> None:
        while not self._finished.wait(RSS_SAMPLING_SECONDS):
            self._peak = max(self._peak, self._anonymous())

    def __enter__(self) -> "PeakAnonymousGrowth":
        return_freed_memory_to_os()
        self._baseline = self._peak = self._anonymous()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._finished.set()
        self._thread.join()
        self.growth_bytes = max(self._peak, self._anonymous()) - self._baseline


@dataclass
class Timed:
    """One sampler's run: indices (possibly a prefix), seconds, extrapolated full seconds, memory growth."""

    indices: torch.Tensor
    seconds: float
    full_seconds: float
    growth_bytes: int
    measured: bool


def make_features(kind: str, rows: int, dim: int, seed: int) -> tuple[torch.Tensor, bool]:
    """Synthetic features written block by block into phase 2's storage; whether they landed on disk."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(256, dim, generator=generator)
    collector = PatchRowCollector("auto", expected_images=rows // GENERATION_BLOCK_ROWS + 1)
    for start in range(0, rows, GENERATION_BLOCK_ROWS):
        count = min(GENERATION_BLOCK_ROWS, rows - start)
        block = torch.randn(count, dim, generator=generator)
        if kind == "clustered":
            assignment = torch.randint(len(prototypes), (count,), generator=generator)
            block = block.mul_(0.5).add_(prototypes[assignment]).relu_()
            duplicates = torch.randint(count, (count // 10,), generator=generator)
            block[torch.randint(count, (count // 10,), generator=generator)] = block[duplicates].clone()
        collector.add(block, images=1)
    on_disk = collector.on_disk
    return collector.rows(), on_disk


def timed(run: Callable[[], _T]) -> tuple[_T, float, int]:
    """``run()``'s result, seconds and anonymous-memory growth."""
    with PeakAnonymousGrowth() as memory:
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
    return result, seconds, memory.growth_bytes


def run_chunked(features: torch.Tensor, ratio: float, seed: int) -> Timed:
    """The chunked sampler, projection and selection, in full."""
    sampler = ChunkedKCenterGreedy(ratio, seed=seed)
    indices, seconds, growth = timed(lambda: sampler.select_coreset_idxs(features))
    return Timed(indices, seconds, seconds, growth, measured=True)


def run_exact(features: torch.Tensor, ratio: float, seed: int, full: bool, budget_seconds: float) -> Timed:
    """The exact greedy in full, or a prefix of its steps within ``budget_seconds``, extrapolated."""
    picks = int(len(features) * ratio)
    if full:
        sampler = FastKCenterGreedy(features, ratio, seed=seed)
        indices, seconds, growth = timed(lambda: torch.tensor(sampler.select_coreset_idxs()))
        return Timed(indices, seconds, seconds, growth, measured=True)
    probe = run_fast(features, ratio, seed, steps=3)
    steps = max(3, min(picks, int((budget_seconds - probe.projection_seconds) / probe.seconds_per_step())))
    prefix, seconds, growth = timed(lambda: run_fast(features, ratio, seed, steps=steps))
    return Timed(torch.tensor(prefix.indices), seconds, prefix.extrapolated_seconds(picks), growth, measured=False)


def coverage_radius(features: torch.Tensor, bank: torch.Tensor) -> float:
    """Largest distance from any row of ``features`` to its nearest row of ``bank``."""
    return max(float(torch.cdist(block, bank).min(dim=1).values.max()) for block in features.split(8192))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (the command line by default), run every size x ratio pair, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000, 3_000_000])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--features", choices=["gaussian", "clustered"], default="clustered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-exact-max-rows", type=int, default=100_000,
                        help="run the exact greedy in full (and compare coverage) up to this many rows")
    parser.add_argument("--exact-budget", type=float, default=60.0,
                        help="seconds of exact greedy steps per row above --full-exact-max-rows (extrapolated)")
    add_json_option(parser)
    args = parser.parse_args(argv)
    measured = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.features} features, d={args.dim}")
    print("\n| rows | ratio | picks | storage | exact s | chunked s | speed-up | exact MiB | chunked MiB "
          "| radius exact / chunked / random | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in args.sizes:
        features, on_disk = make_features(args.features, rows, args.dim, args.seed)
        for ratio in args.ratios:
            full = rows <= args.full_exact_max_rows
            exact = run_exact(features, ratio, args.seed, full, args.exact_budget)
            chunked = run_chunked(features, ratio, args.seed)
            radius, radii = "-", None
            if full:
                control = torch.randperm(rows, generator=torch.Generator().manual_seed(args.seed))[: len(exact.indices)]
                radii = dict(zip(("exact", "chunked", "random"), (
                    coverage_radius(features, features[chosen]) for chosen in (exact.indices, chunked.indices, control)
                ), strict=True))
                radius = " / ".join(f"{value:.2f}" for value in radii.values())
            exact_text = f"{exact.full_seconds:.0f}" + ("" if exact.measured else " (extrapolated)")
            print(f"| {rows:,} | {ratio:g} | {int(rows * ratio):,} | {'disk' if on_disk else 'memory'} "
                  f"| {exact_text} | {chunked.seconds:.0f} | {exact.full_seconds / chunked.seconds:.1f}x "
                  f"| {exact.growth_bytes / 2**20:.0f} | {chunked.growth_bytes / 2**20:.0f} | {radius} "
                  f"| {os.getloadavg()[0]:.1f} |", flush=True)
            measured.append({
                "rows": rows, "ratio": ratio, "picks": int(rows * ratio), "storage": "disk" if on_disk else "memory",
                "seconds": {"exact": exact.full_seconds, "chunked": chunked.seconds},
                "exact_extrapolated": not exact.measured,
                "growth_mib": {"exact": exact.growth_bytes / 2**20, "chunked": chunked.growth_bytes / 2**20},
                "coverage_radius": radii,
            })  # fmt: skip
        del features
    write_json(args.json, measured)


if __name__ == "__main__":
    main()
