"""The records of a benchmark: one :class:`ModelRun` per model, category and seed, and their containers.

These are the schema ``report`` reads and ``results.json`` holds (``as_record``).
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalib_apc.benchmark.rows import Row, RowKind
from anomalib_apc.benchmark.settings import CONFIG_FILE, BenchmarkSettings


@dataclass(frozen=True)
class Initialisation:
    """Where both models' starting weights come from.

    Attributes:
        pre_trained: Load timm's hub weights.
        init_weights: Checkpoint file, or the name of named weights, to load instead.
        description: One line for the report.
        notice: Set when the requested weights could not be had and both models fall back to random.
    """

    pre_trained: bool
    init_weights: str | Path | None
    description: str
    notice: str | None = None


@dataclass
class TestEvidence:
    """What the figures need from one model's test: ROC curves and a few anomaly maps.

    Attributes:
        image_roc: False and true positive rates over the image scores.
        pixel_roc: The same over all pixels of the anomaly maps (``None`` without masks).
        example_maps: Anomaly maps of the example images by path, scaled to [0, 1] by the range of
            this model's maps over the whole test set, so that colours compare across images.
        example_masks: Ground-truth masks of the example images by path (model resolution).
    """

    image_roc: tuple[np.ndarray, np.ndarray]
    pixel_roc: tuple[np.ndarray, np.ndarray] | None
    example_maps: dict[str, np.ndarray]
    example_masks: dict[str, np.ndarray]


@dataclass
class ModelRun:
    """The outcome of one model on one category and seed; ``error`` is set when it failed.

    Quantities a run does not have stay NaN (``null`` in JSON): Patchcore's fine-tuning time, and
    everything of a failed run.
    """

    model: str
    category: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    finetune_s: float = math.nan
    memory_bank_s: float = math.nan
    inference_ms_per_image: float = math.nan
    memory_bank_rows: int = 0
    memory_bank_dim: int = 0
    num_test_images: int = 0
    num_test_anomalous: int = 0
    error: str | None = None
    test_image_paths: list[str] = field(default_factory=list, repr=False)
    evidence: TestEvidence | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Whether the run finished and has metrics."""
        return self.error is None

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly row without the per-image data."""
        record = asdict(self)
        for bulky in ("test_image_paths", "evidence"):
            record.pop(bulky)
        return record


@dataclass
class SplitRun:
    """One category and seed: every model's run."""

    category: str
    seed: int
    runs: list[ModelRun]


@dataclass
class BenchmarkResult:
    """All runs of a benchmark, with the settings, rows and initialisation they used."""

    settings: BenchmarkSettings
    rows: tuple[Row, ...]
    initialisation: Initialisation
    device: str
    splits: list[SplitRun] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    """One line per row left out before training (e.g. ``APC imagenet-init`` without pretrained weights)."""

    @property
    def row_names(self) -> list[str]:
        """The rows' names in table order."""
        return [row.name for row in self.rows]

    @property
    def baseline_names(self) -> list[str]:
        """The baseline rows' names, the first of them the reference every row is compared with."""
        return [row.name for row in self.rows if row.kind is RowKind.BASELINE]

    @property
    def variant_names(self) -> list[str]:
        """The APC variant rows' names, each also compared with APC."""
        return [row.name for row in self.rows if row.kind is RowKind.VARIANT]

    @property
    def runs(self) -> list[ModelRun]:
        """Every model run, in the order they ran."""
        return [run for split in self.splits for run in split.runs]

    @property
    def failures(self) -> list[str]:
        """One line per failed run."""
        return [f"{run.model} on {run.category}, seed {run.seed}: {run.error}" for run in self.runs if not run.ok]


RESULT_FILES = {"markdown": "results.md", "csv": "results.csv", "json": "results.json"}
"""The tables ``report`` writes into the output folder, by kind."""
FIGURES_DIR = "figures"
RUNS_DIR = "runs"
"""Each model's run folder (anomalib's ``default_root_dir``) lies under ``output/runs/<category>/seed<N>/``."""
DEMO_DATASET_DIR = "demo_dataset"
"""Where the demo dataset is written inside the output folder when no root is given; kept across runs."""
BENCHMARK_OUTPUTS = (*RESULT_FILES.values(), CONFIG_FILE, FIGURES_DIR, RUNS_DIR)
"""Everything a benchmark writes into its output folder besides the demo dataset."""
