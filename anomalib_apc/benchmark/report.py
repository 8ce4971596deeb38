"""Tables and figures of a benchmark: ``results.md``, ``results.csv``, ``results.json`` and ``figures/``.

Every table has one row per model and category, with the mean and the sample standard deviation
over the seeds, and a ``mean`` row per model (in ``results.md`` only when there are several
categories, as it would repeat the one category otherwise). The mean row averages each seed's categories first and
then takes mean and spread over seeds, so its spread is the seed-to-seed spread of the average, the
figure a user deciding between the models needs. ``results.md`` adds APC's paired difference to
Patchcore (same category and seed, so the split's own difficulty cancels out).

The figures are written with matplotlib's object API (no pyplot), so no display backend is needed.
"""

import csv
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from anomalib_apc.benchmark.runner import APC, PATCHCORE, BenchmarkResult, ModelRun

MEAN_CATEGORY = "mean"
FIGURE_MODELS = (PATCHCORE, APC)
"""Models shown in the figures; the fast-coreset Patchcore has the same maps as Patchcore."""


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
    models = result.settings.model_names
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


def paired_differences(result: BenchmarkResult) -> list[dict[str, Any]]:
    """APC minus Patchcore per category and for the category mean, over the seeds both finished."""
    finished = {(run.model, run.category, run.seed): run for run in result.runs if run.ok}
    categories = list(dict.fromkeys(run.category for run in result.runs))
    by_category: dict[str, dict[int, dict[str, float]]] = {}
    for category in categories:
        for seed in result.settings.seeds:
            apc, patchcore = finished.get((APC, category, seed)), finished.get((PATCHCORE, category, seed))
            if apc and patchcore:
                by_category.setdefault(category, {})[seed] = {
                    q.key: q.read(apc) - q.read(patchcore) for q in METRIC_QUANTITIES
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
    differences = paired_differences(result)
    paths = {
        "markdown": output / "results.md",
        "csv": output / "results.csv",
        "json": output / "results.json",
    }
    paths["markdown"].write_text(markdown_report(result, summary, differences))
    _write_csv(paths["csv"], [row.as_record() for row in summary])
    paths["json"].write_text(json.dumps(_json_report(result, summary, differences), indent=2))
    for figure_path in write_figures(result, output / "figures"):
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
        "initialisation": {
            "description": result.initialisation.description,
            "notice": result.initialisation.notice,
        },
        "summary": [row.as_record() for row in summary],
        "apc_minus_patchcore": differences,
        "runs": [_finite_record(run.as_record()) for run in result.runs],
        "failures": result.failures,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: unmeasured quantities of failed runs become null."""
    return {key: _finite_or_none(value) if isinstance(value, float) else value for key, value in record.items()}


def markdown_report(result: BenchmarkResult, summary: Sequence[SummaryRow], differences: Sequence[dict]) -> str:
    """The report as Markdown: settings, the results table, APC's paired differences, failures."""
    settings, initialisation = result.settings, result.initialisation
    seeds = ", ".join(str(seed) for seed in settings.seeds)
    lines = [
        "# Patchcore vs AnomalousPatchCore",
        "",
        (
            f"- Data: {settings.dataset} ({_data_location(result)}); {settings.num_anomalies} anomalies per "
            "category moved from test to APC's training and removed from both models' test sets."
        ),
        (
            f"- Backbone {settings.backbone} ({', '.join(settings.layers)}), {settings.image_size} px, coreset "
            f"{100 * settings.coreset_sampling_ratio:g} %, for both models; initialisation: "
            f"{initialisation.description}."
        ),
        (
            f"- APC: {settings.finetune_epochs} fine-tuning epochs, batch {settings.train_batch_size}. "
            f"Seeds: {seeds}. Device: {result.device}."
        ),
    ]
    test_sets = _test_set_sizes(result)
    if test_sets:
        lines.append(f"- Test images (anomalous): {test_sets}.")
    if initialisation.notice:
        lines += ["", f"> **Notice:** {initialisation.notice}"]
    if len({row.category for row in summary}) <= 2:  # one category: its mean rows would repeat it
        summary = [row for row in summary if row.category != MEAN_CATEGORY]
    lines += ["", *_markdown_table(["Model", "Category", *(q.header for q in QUANTITIES)], _table_cells(summary)), ""]
    lines.append(
        "Metrics in %: mean ± sample standard deviation over seeds (no spread with one seed). F1 at the "
        "F1-optimal threshold (anomalib `F1Max`); AUPRO up to 30 % false positive rate. Times are wall-clock: "
        "fine-tuning is APC's training passes, memory bank is embedding the normal images plus the coreset, "
        "inference is pre-processing plus forward pass per test image "
        f"(batches of {settings.eval_batch_size}). `mean` rows (several categories) average each seed's categories first."
    )
    if differences:
        lines += ["", "## APC minus Patchcore (paired by category and seed)", ""]
        cells = [
            [
                row["category"],
                *(_format_value(row[q.key], row[f"{q.key}_std"], q, signed=True) for q in METRIC_QUANTITIES),
            ]
            for row in differences
        ]
        lines += _markdown_table(["Category", *(q.header for q in METRIC_QUANTITIES)], cells)
    if result.failures:
        lines += ["", "## Failed runs", "", *(f"- {failure}" for failure in result.failures)]
    lines += ["", "Figures: `figures/` (the same test images side by side, ROC curves).", ""]
    return "\n".join(lines)


def _data_location(result: BenchmarkResult) -> str:
    categories = list(dict.fromkeys(run.category for run in result.runs)) or list(result.settings.categories)
    root = result.settings.root if result.settings.root is not None else result.settings.output / "demo_dataset"
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
        values[-1] = f"{values[-1]} × {row.memory_bank_dim}"
        cells.append([row.model, f"**{row.category}**" if row.category == MEAN_CATEGORY else row.category, *values])
    return cells


def _format_value(mean: float, std: float | None, quantity: Quantity, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
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


def write_figures(result: BenchmarkResult, folder: Path) -> list[Path]:
    """Per category: the same test images side by side and the ROC curves; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    categories = list(dict.fromkeys(run.category for run in result.runs))
    for category in categories:
        runs = [run for run in result.runs if run.category == category and run.evidence is not None]
        if not runs:
            continue
        written.append(_heatmap_figure(category, runs, folder / f"{category}_heatmaps.png"))
        written.append(_roc_figure(category, runs, folder / f"{category}_roc.png"))
    return written


def _heatmap_figure(category: str, runs: Sequence[ModelRun], path: Path) -> Path:
    """Rows: example test images of the first seed; columns: input, ground truth, each model's map."""
    seed = min(run.seed for run in runs)
    maps_by_model = {run.model: run.evidence for run in runs if run.seed == seed and run.model in FIGURE_MODELS}
    models = [model for model in FIGURE_MODELS if model in maps_by_model]
    first = maps_by_model[models[0]]
    examples = list(first.example_maps)
    columns = ["Input", "Ground truth", *(f"{model} map" for model in models)]
    figure = Figure(figsize=(2.4 * len(columns), 2.4 * len(examples) + 0.6), layout="constrained")
    axes = figure.subplots(len(examples), len(columns), squeeze=False)
    for row, image_path in enumerate(examples):
        size = first.example_maps[image_path].shape[::-1]
        with Image.open(image_path) as image:
            panels = [np.asarray(image.convert("RGB").resize(size))]
        mask = first.example_masks.get(image_path)
        panels.append(mask if mask is not None else np.zeros(size[::-1]))
        panels += [maps_by_model[model].example_maps[image_path] for model in models]
        for column, panel in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(panel, cmap=None if column == 0 else ("gray" if column == 1 else "jet"), vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(columns[column], fontsize=10)
        axes[row, 0].set_ylabel(f"{Path(image_path).parent.name}/{Path(image_path).name}", fontsize=8)
    figure.suptitle(f"{category}, seed {seed}: each model's maps scaled to its own test-set range", fontsize=10)
    figure.savefig(path, dpi=100)
    return path


def _roc_figure(category: str, runs: Sequence[ModelRun], path: Path) -> Path:
    """Image-level and pixel-level ROC curves, one line per model and seed."""
    figure = Figure(figsize=(10, 4.6), layout="constrained")
    axes = figure.subplots(1, 2)
    colours = {PATCHCORE: "tab:blue", APC: "tab:red"}
    for axis, level, metric in ((axes[0], "image", "image_AUROC"), (axes[1], "pixel", "pixel_AUROC")):
        for model in FIGURE_MODELS:
            model_runs = [run for run in runs if run.model == model]
            curves = [getattr(run.evidence, f"{level}_roc") for run in model_runs]
            if not model_runs or any(curve is None for curve in curves):
                continue
            auroc = 100 * statistics.fmean(run.metrics[metric] for run in model_runs)
            for index, (fpr, tpr) in enumerate(curves):
                label = (
                    f"{model} (AUROC {auroc:.2f}, {len(curves)} seed{'s' * (len(curves) > 1)})" if index == 0 else None
                )
                axis.plot(fpr, tpr, color=colours[model], alpha=0.8 if len(curves) == 1 else 0.5, label=label)
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axis.set(xlabel="False positive rate", ylabel="True positive rate", title=f"{category}: {level}-level ROC")
        axis.set_aspect("equal")
        axis.legend(loc="lower right", fontsize=8)
    figure.savefig(path, dpi=100)
    return path
