"""Scoring a set of image files with a bundle into ``scores.csv`` and overlay images, from Python or ``predict``.

Every input file gets one row in ``scores.csv``, in input order: ``status`` is ``ok`` with its score,
label and overlay, or the reason the file could not be used (it names the file), so a bad file costs
its own row and nothing else. Rows are flushed after each batch, so an interrupted run keeps what it
scored. Files are read straight to the model's input size (``read_image_file(path, size=...)``), so a
batch never holds full-size images.

Example:
    >>> from anomalib_apc.deploy import predict_folder
    >>> summary = predict_folder("bundle", ["images/"], "predictions")
    >>> summary.scored, summary.failures
"""

import csv
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anomalib.visualization import ImageVisualizer
from tqdm import tqdm

from anomalib_apc.errors import InvalidInputError, OutputExistsError

from .images import ImageReadError, list_image_files, read_image_file
from .inferencer import ApcInferencer
from .options import OVERLAY_DIR, SCORES_FILE, SearchMode

SCORE_COLUMNS = ("path", "status", "score", "label", "overlay")
STATUS_OK = "ok"
OVERLAY_SUFFIX = ".png"


@dataclass(frozen=True)
class PredictionSummary:
    """What ``predict_folder`` wrote.

    Attributes:
        scores_file: The ``scores.csv`` (one row per input file).
        overlay_dir: Folder of the overlays (image | anomaly map | mask, anomalib's visualiser).
        images: Input files.
        scored: Of them, those scored.
        failures: One message per file that could not be used, naming it.
    """

    scores_file: Path
    overlay_dir: Path
    images: int
    scored: int
    failures: list[str] = field(default_factory=list)


def predict_folder(
    bundle: str | Path | ApcInferencer,
    inputs: Sequence[str | Path],
    output: str | Path,
    batch_size: int = 8,
    search: SearchMode = "default",
    num_threads: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> PredictionSummary:
    """Score every image file of ``inputs`` (files, or folders searched recursively) into ``output``.

    Args:
        bundle: A bundle folder, or an ``ApcInferencer`` already loaded (then ``search`` and
            ``num_threads`` are its own).
        inputs: Image files and folders.
        output: Folder for ``scores.csv`` and ``overlays/``.
        batch_size: Images per inference call.
        search: Search mode of the inferencer (see ``ApcInferencer``).
        num_threads: CPU threads for OpenVINO and faiss (default: all available).
        overwrite: Replace the ``scores.csv`` and ``overlays/`` of an earlier run in ``output``.
        show_progress: Show a progress bar.

    Returns:
        The summary; ``failures`` lists the files that could not be read.

    Raises:
        InvalidInputError: ``batch_size`` below 1, or a bundle that cannot be used.
        MissingInputError: An input path does not exist, or a folder holds no image.
        OutputExistsError: ``output`` is not empty and ``overwrite`` is off, or it holds files that
            are not the output of an earlier prediction.
    """
    if batch_size < 1:
        msg = f"batch_size (--batch-size) must be at least 1, got {batch_size}."
        raise InvalidInputError(msg)
    unique: dict[Path, Path] = {}  # a file named twice (itself and inside a named folder) is scored once
    for path in list_image_files(inputs):
        unique.setdefault(path.resolve(), path)
    files = list(unique.values())
    directory = Path(output)
    _check_output(directory, overwrite)
    inferencer = bundle if isinstance(bundle, ApcInferencer) else ApcInferencer(
        bundle, num_threads=num_threads, search=search,
    )
    _clear_output(directory)
    overlay_root = directory / OVERLAY_DIR
    overlay_names = _overlay_names(files)
    visualizer = ImageVisualizer()
    failures: list[str] = []
    with (directory / SCORES_FILE).open("w", newline="") as scores_file, \
            tqdm(total=len(files), desc="Scoring images", unit="image", disable=not show_progress) as progress:
        scores = csv.writer(scores_file)
        scores.writerow(SCORE_COLUMNS)
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            rows: dict[Path, list[str]] = {}
            readable, images = [], []
            for path in batch:
                try:
                    images.append(read_image_file(path, size=inferencer.image_size))
                    readable.append(path)
                except (ImageReadError, OSError) as error:
                    failures.append(str(error))
                    rows[path] = [str(path), str(error), "", "", ""]
            if images:
                result = inferencer.predict(images)
                for path, item, overlay in zip(readable, result, _as_list(visualizer.visualize(result)), strict=True):
                    overlay_path = overlay_root / overlay_names[path]
                    overlay_path.parent.mkdir(parents=True, exist_ok=True)
                    overlay.save(overlay_path)
                    label = "" if item.pred_label is None else ("anomalous" if bool(item.pred_label) else "normal")
                    rows[path] = [str(path), STATUS_OK, f"{float(item.pred_score):.6f}", label, str(overlay_path)]
            scores.writerows(rows[path] for path in batch)
            scores_file.flush()
            progress.update(len(batch))
    return PredictionSummary(directory / SCORES_FILE, overlay_root, len(files), len(files) - len(failures), failures)


def _check_output(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write into a used folder unless it holds an earlier prediction to replace."""
    if directory.exists() and not directory.is_dir():
        msg = f"{directory} exists and is not a folder; choose another --output."
        raise OutputExistsError(msg)
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            msg = (f"{directory} exists and is not empty; choose another folder "
                   "or replace its predictions (--overwrite).")
            raise OutputExistsError(msg)
        unknown = sorted(path.name for path in directory.iterdir() if path.name not in {SCORES_FILE, OVERLAY_DIR})
        if unknown:
            msg = (
                f"{directory} holds files that predict did not write ({', '.join(unknown[:5])}); "
                "refusing to overwrite a folder that is not a prediction output."
            )
            raise OutputExistsError(msg)


def _clear_output(directory: Path) -> None:
    """Remove an earlier run's ``scores.csv`` and overlays, so that no stale overlay stays beside new scores."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SCORES_FILE).unlink(missing_ok=True)
    if (directory / OVERLAY_DIR).exists():
        shutil.rmtree(directory / OVERLAY_DIR)


def _overlay_names(files: Sequence[Path]) -> dict[Path, Path]:
    """Each file's overlay path under ``overlays/``: its path below the inputs' common folder, its name plus ``.png``.

    The full name is kept (``a.jpg`` -> ``a.jpg.png``), so ``a.png`` and ``a.jpg`` get two overlays,
    and the sub-folders are kept, so equal names in different folders do not collide either.
    """
    if not files:
        return {}
    resolved = {file: file.resolve() for file in files}
    common = resolved[files[0]].parent
    while not all(path.is_relative_to(common) for path in resolved.values()):
        common = common.parent
    return {file: path.relative_to(common).with_name(path.name + OVERLAY_SUFFIX) for file, path in resolved.items()}


def _as_list(visualization: object) -> list:
    return visualization if isinstance(visualization, list) else [visualization]
