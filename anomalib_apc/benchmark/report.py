"""Tables and figures of a benchmark: ``results.md``, ``results.csv``, ``results.json`` and ``figures/``.

Every table has one row per model and category, with the mean and the sample standard deviation
over the seeds, and a ``mean`` row per model (in ``results.md`` only when there are several
categories, as it would repeat the one category otherwise). The mean row averages each seed's categories first and
then takes mean and spread over seeds, so its spread is the seed-to-seed spread of the average, the
figure a user deciding between the models needs. ``results.md`` adds the paired differences (same
category and seed, so the split's own difficulty cancels out) of every row to the first baseline
(Patchcore by default) and of every APC variant to APC.

The figures come from ``figures``.
"""

import csv
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_apc.benchmark.figures import write_figures
from anomalib_apc.benchmark.results import DEMO_DATASET_DIR, FIGURES_DIR, RESULT_FILES, BenchmarkResult, ModelRun
from anomalib_apc.benchmark.rows import RowKind
from anomalib_apc.benchmark.settings import APC, PATCHCORE, BenchmarkSettings
from anomalib_apc.benchmark.verdict import verdict_lines

MEAN_CATEGORY = "mean"


@dataclass(frozen=True)
class Quantity:
    """One column: how to read it from a run and how ``results.md`` prints it."""

    key: str
    header: str
    read: Callable[[ModelRun], float]
    percent: bool = False
    decimals: int = 2
    show_spread: bool = True


def _metric(name: str) -> Callable[[ModelRun], float]:
    return lambda run: run.metrics[name]


QUANTITIES = (
    Quantity("image_AUROC", "Image AUROC", _metric("image_AUROC"), percent=True),
    Quantity("image_F1", "Image F1", _metric("image_F1Max"), percent=True),
    Quantity("pixel_AUROC", "Pixel AUROC", _metric("pixel_AUROC"), percent=True),
    Quantity("pixel_F1", "Pixel F1", _metric("pixel_F1Max"), percent=True),
    Quantity("AUPRO", "AUPRO", _metric("pixel_AUPRO"), percent=True),
    Quantity("finetune_s", "Fine-tuning s", lambda run: run.finetune_s, decimals=1),
    Quantity("memory_bank_s", "Memory bank s", lambda run: run.memory_bank_s, decimals=1),
    Quantity("inference_ms_per_image", "Inference ms/img", lambda run: run.inference_ms_per_image, decimals=1),
    Quantity("memory_bank_rows", "Memory bank rows", lambda run: run.memory_bank_rows, decimals=0, show_spread=False),
)
METRIC_QUANTITIES = tuple(quantity for quantity in QUANTITIES if quantity.percent)
METRIC_HEADERS = {quantity.key: quantity.header for quantity in METRIC_QUANTITIES}


@dataclass(frozen=True)
class SummaryRow:
    """Mean and spread over seeds of every quantity, for one model on one category (or the mean)."""

    model: str
    category: str
    num_seeds: int
    mean: dict[str, float]
    std: dict[str, float]
    memory_bank_dim: int

    def as_record(self) -> dict[str, Any]:
        """Flat record: ``<quantity>`` is the mean, ``<quantity>_std`` the spread."""
        record: dict[str, Any] = {"model": self.model, "category": self.category, "seeds": self.num_seeds}
        for quantity in QUANTITIES:
            record[quantity.key] = _finite_or_none(self.mean[quantity.key])
            record[f"{quantity.key}_std"] = _finite_or_none(self.std[quantity.key])
        record["memory_bank_dim"] = self.memory_bank_dim
        return record


def summarise(result: BenchmarkResult) -> list[SummaryRow]:
    """Rows per category in run order, models in table order, then a ``mean`` row per model."""
    models = result.row_names
    finished = [run for run in result.runs if run.ok]
    categories = list(dict.fromkeys(run.category for run in result.runs))
    rows = []
    for category in categories:
        for model in models:
            runs = [run for run in finished if run.model == model and run.category == category]
            if runs:
                per_seed = {run.seed: {q.key: q.read(run) for q in QUANTITIES} for run in runs}
                rows.append(_summary_row(model, category, per_seed, runs[0].memory_bank_dim))
    for model in models:
        per_seed = {}
        for seed in result.settings.seeds:
            runs = [run for run in finished if run.model == model and run.seed == seed]
            if runs:
                per_seed[seed] = {q.key: statistics.fmean(q.read(run) for run in runs) for q in QUANTITIES}
        if per_seed:
            dim = next(run.memory_bank_dim for run in finished if run.model == model)
            rows.append(_summary_row(model, MEAN_CATEGORY, per_seed, dim))
    return rows


def _summary_row(model: str, category: str, per_seed: dict[int, dict[str, float]], dim: int) -> SummaryRow:
    values = {quantity.key: [per_seed[seed][quantity.key] for seed in per_seed] for quantity in QUANTITIES}
    return SummaryRow(
        model=model,
        category=category,
        num_seeds=len(per_seed),
        mean={key: statistics.fmean(series) for key, series in values.items()},
        std={key: _spread(series) for key, series in values.items()},
        memory_bank_dim=dim,
    )


def _spread(values: Sequence[float]) -> float:
    """Sample standard deviation; NaN for one value or when a value is missing (NaN) itself."""
    if len(values) < 2 or not all(math.isfinite(value) for value in values):
        return math.nan
    return statistics.stdev(values)


def difference_pairs(result: BenchmarkResult) -> list[tuple[str, str]]:
    """(model, reference) of every paired-difference table row: each row minus the first baseline, variants minus APC.

    The first baseline is Patchcore by default; the variants are also compared with APC, which tells
    what each change to APC does on the same split and seed.
    """
    reference = result.baseline_names[0]
    pairs = [(model, reference) for model in result.row_names if model != reference]
    return pairs + [(variant, APC) for variant in result.variant_names]


def all_paired_differences(result: BenchmarkResult) -> list[dict[str, Any]]:
    """:func:`paired_differences` for every pair of :func:`difference_pairs`, each row naming model and reference."""
    return [
        {"model": model, "reference": reference, **row}
        for model, reference in difference_pairs(result)
        for row in paired_differences(result, model, reference)
    ]


def paired_differences(result: BenchmarkResult, model: str = APC, reference: str = PATCHCORE) -> list[dict[str, Any]]:
    """``model`` minus ``reference`` per category and for the category mean, over the seeds both finished."""
    finished = {(run.model, run.category, run.seed): run for run in result.runs if run.ok}
    categories = list(dict.fromkeys(run.category for run in result.runs))
    by_category: dict[str, dict[int, dict[str, float]]] = {}
    for category in categories:
        for seed in result.settings.seeds:
            minuend, subtrahend = finished.get((model, category, seed)), finished.get((reference, category, seed))
            if minuend and subtrahend:
                by_category.setdefault(category, {})[seed] = {
                    q.key: q.read(minuend) - q.read(subtrahend) for q in METRIC_QUANTITIES
                }
    rows = [_difference_row(category, per_seed) for category, per_seed in by_category.items()]
    if len(by_category) > 1:
        seeds = sorted(set.intersection(*(set(per_seed) for per_seed in by_category.values())))
        mean_per_seed = {
            seed: {q.key: statistics.fmean(by_category[c][seed][q.key] for c in by_category) for q in METRIC_QUANTITIES}
            for seed in seeds
        }
        if mean_per_seed:
            rows.append(_difference_row(MEAN_CATEGORY, mean_per_seed))
    return rows


def _difference_row(category: str, per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {"category": category, "seeds": len(per_seed)}
    for quantity in METRIC_QUANTITIES:
        series = [values[quantity.key] for values in per_seed.values()]
        row[quantity.key] = statistics.fmean(series)
        row[f"{quantity.key}_std"] = _finite_or_none(_spread(series))
    return row


def write_report(result: BenchmarkResult) -> dict[str, Path]:
    """Write the three tables and the figures under ``settings.output``; return their paths by name."""
    output = result.settings.output
    output.mkdir(parents=True, exist_ok=True)
    summary = summarise(result)
    differences = all_paired_differences(result)
    paths = {kind: output / name for kind, name in RESULT_FILES.items()}
    figures = write_figures(result, output / FIGURES_DIR)
    figure_links = [figure.relative_to(output).as_posix() for figure in figures]
    paths["markdown"].write_text(markdown_report(result, summary, differences, figure_links))
    _write_csv(paths["csv"], [row.as_record() for row in summary])
    paths["json"].write_text(json.dumps(_json_report(result, summary, differences), indent=2))
    for figure_path in figures:
        paths[figure_path.stem] = figure_path
    return paths


def _write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    fieldnames = list(records[0]) if records else ["model", "category", "seeds"]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(records)


def _json_report(result: BenchmarkResult, summary: Sequence[SummaryRow], differences: list[dict]) -> dict[str, Any]:
    return {
        "settings": result.settings.as_record(),
        "rows": [row.as_record() for row in result.rows],
        "initialisation": {
            "description": result.initialisation.description,
            "notice": result.initialisation.notice,
        },
        "notices": result.notices,
        "summary": [row.as_record() for row in summary],
        "apc_minus_patchcore": [
            {key: value for key, value in row.items() if key not in ("model", "reference")}
            for row in differences
            if (row["model"], row["reference"]) == (APC, PATCHCORE)
        ],
        "paired_differences": differences,
        "runs": [_finite_record(run.as_record()) for run in result.runs],
        "failures": result.failures,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: unmeasured quantities of failed runs become null."""
    return {key: _finite_or_none(value) if isinstance(value, float) else value for key, value in record.items()}


def markdown_report(
    result: BenchmarkResult,
    summary: Sequence[SummaryRow],
    differences: Sequence[dict],
    figure_links: Sequence[str] = (),
) -> str:
    """The report as Markdown: the verdict, settings, the results table, paired differences, failures, figures.

    ``figure_links`` are the figures' paths relative to the report, shown inline at the end.
    """
    settings, initialisation = result.settings, result.initialisation
    seeds = ", ".join(str(seed) for seed in settings.seeds)
    lines = [
        f"# {' vs '.join(_titled_baselines(result))} vs AnomalousPatchCore",
        "",
        *verdict_lines(differences, result.baseline_names[0], METRIC_HEADERS),
        "## Settings",
        "",
        (
            f"- Data: {settings.dataset} ({_data_location(result)}); {settings.num_anomalies} anomalies per "
            f"category moved from test to APC's training ({_ANNOTATION_TEXT[settings.annotation]}) and removed "
            "from both models' test sets."
        ),
        (
            f"- Backbone {settings.backbone} ({', '.join(settings.layers)}), {_size_text(settings)}, coreset "
            f"{100 * settings.coreset_sampling_ratio:g} % ({settings.coreset_sampler} sampler), for every model; "
            "initialisation: "
            f"{initialisation.description}{_key_map_text(settings)}."
        ),
        (
            f"- APC: {settings.finetune_epochs} fine-tuning epochs, batch {settings.train_batch_size}. "
            f"Seeds: {seeds}. Device: {result.device}."
        ),
    ]
    test_sets = _test_set_sizes(result)
    if test_sets:
        lines.append(f"- Test images (anomalous): {test_sets}.")
    variants = ", ".join(row.variant.name for row in result.rows if row.variant)
    if variants:
        lines.append(f"- APC variants (configs/ablations/, same split, seeds and initial weights): {variants}.")
    for notice in ([initialisation.notice] if initialisation.notice else []) + result.notices:
        lines += ["", f"> **Notice:** {notice}"]
    if len({row.category for row in summary}) <= 2:  # one category: its mean rows would repeat it
        summary = [row for row in summary if row.category != MEAN_CATEGORY]
    lines += ["", *_markdown_table(["Model", "Category", *(q.header for q in QUANTITIES)], _table_cells(summary)), ""]
    lines.append(
        "Metrics in %: mean ± sample standard deviation over seeds (no spread with one seed). F1 at the "
        "F1-optimal threshold (anomalib `F1Max`); AUPRO up to 30 % false positive rate. Times are wall-clock: "
        "fine-tuning is APC's training passes, memory bank is embedding the normal images plus the coreset, "
        "inference is pre-processing plus forward pass per test image "
        f"(batches of {settings.eval_batch_size}). `mean` rows (several categories) average each seed's "
        "categories first."
    )
    for reference in dict.fromkeys(row["reference"] for row in differences):
        rows = [row for row in differences if row["reference"] == reference]
        lines += ["", f"## Minus {reference} (paired by category and seed)", ""]
        cells = [
            [
                row["model"],
                row["category"],
                *(_format_value(row[q.key], row[f"{q.key}_std"], q, signed=True) for q in METRIC_QUANTITIES),
            ]
            for row in rows
        ]
        lines += _markdown_table(["Model", "Category", *(q.header for q in METRIC_QUANTITIES)], cells)
    if result.failures:
        lines += ["", "## Failed runs", "", *(f"- {failure}" for failure in result.failures)]
    lines += ["", "## Figures", "", "The same test images under each model, and the ROC curves of every seed.", ""]
    lines += [f"![{Path(link).stem.replace('_', ' ')}]({link})" for link in figure_links] or ["(no run finished)"]
    lines.append("")
    return "\n".join(lines)


def _titled_baselines(result: BenchmarkResult) -> list[str]:
    """The baselines the title names: the fast-coreset Patchcore is Patchcore timed differently, not another model."""
    return [row.name for row in result.rows if row.kind is RowKind.BASELINE and not row.fast_coreset]


_ANNOTATION_TEXT = {
    "mask": "with their masks",
    "box": "with the boxes of their masks' regions instead of masks",
    "label": "with their labels alone, masks dropped",
}


def _size_text(settings: BenchmarkSettings) -> str:
    height, width = settings.image_shape
    return f"{height} px" if height == width else f"{height} x {width} px (height x width)"


def _key_map_text(settings: BenchmarkSettings) -> str:
    pairs = ", ".join(f"{pattern!r} -> {replacement!r}" for pattern, replacement in settings.key_map.items())
    return f" (checkpoint keys renamed: {pairs})" if pairs else ""


def _data_location(result: BenchmarkResult) -> str:
    categories = list(dict.fromkeys(run.category for run in result.runs)) or list(result.settings.categories)
    root = result.settings.root if result.settings.root is not None else result.settings.output / DEMO_DATASET_DIR
    return f"{root}, categories: {', '.join(categories)}"


def _test_set_sizes(result: BenchmarkResult) -> str:
    sizes = {}
    for run in result.runs:
        if run.ok:
            sizes.setdefault(run.category, f"{run.category}: {run.num_test_images} ({run.num_test_anomalous})")
    return "; ".join(sizes.values())


def _table_cells(summary: Sequence[SummaryRow]) -> list[list[str]]:
    cells = []
    for row in summary:
        values = [_format_value(row.mean[q.key], row.std[q.key], q) for q in QUANTITIES]
        values[-1] = f"{values[-1]} × {row.memory_bank_dim}"  # noqa: RUF001 - the multiplication sign, on purpose
        cells.append([row.model, f"**{row.category}**" if row.category == MEAN_CATEGORY else row.category, *values])
    return cells


def _format_value(mean: float, std: float | None, quantity: Quantity, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"  # noqa: RUF001 - an en dash for "not measured", on purpose
    scale = 100 if quantity.percent else 1
    sign = "+" if signed else ""
    text = f"{scale * mean:{sign}.{quantity.decimals}f}"
    if quantity.show_spread and std is not None and math.isfinite(std):
        text += f" ± {scale * std:.{quantity.decimals}f}"
    return text


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
