"""The figures of a benchmark: per category, the same test images side by side and the ROC curves.

Written with matplotlib's object API (no pyplot), so no display backend is needed.
"""

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torchvision.transforms.v2.functional import resize

from anomalib_apc.benchmark.results import BenchmarkResult, ModelRun
from anomalib_apc.benchmark.settings import APC, PATCHCORE
from anomalib_apc.data import read_image

FIGURE_MODELS = (PATCHCORE, APC)
"""Models shown in the figures; the fast-coreset Patchcore has the same maps as Patchcore."""


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


def input_panel(image_path: str, size: tuple[int, int]) -> np.ndarray:
    """The test image as the model read it (16-bit scaled, not clipped to white), ``(H, W, 3)`` at ``size`` (W, H)."""
    image = resize(read_image(image_path), [size[1], size[0]], antialias=True).clamp(0, 1)
    return image.permute(1, 2, 0).numpy()


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
        panels = [input_panel(image_path, size)]
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
