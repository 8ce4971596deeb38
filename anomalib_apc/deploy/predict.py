"""Scoring a set of image files with a bundle into ``scores.csv`` and overlay images, from Python or ``predict``.

Every input file gets one row in ``scores.csv``, in input order: ``status`` is ``ok`` with its score,
label and overlay, or the reason the file could not be used (it names the file), so a bad file costs
its own row and nothing else: a file that cannot be read, and an image that the inferencer refuses
(its batch is then scored image by image). ``scores.csv`` is replaced atomically as it grows, so an
interrupted run keeps what it scored and a reader never sees a partial row; the output folder is
locked for the run, so a second run into it is refused instead of mixing with this one. Files are
read straight to the model's input size (``read_image_file(path, size=...)``), so a batch never holds
full-size images.

Example:
    >>> from anomalib_apc.deploy import predict_folder
    >>> summary = predict_folder("bundle", ["images/"], "predictions")
    >>> summary.scored, summary.failures
"""

import csv
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from anomalib.data import ImageBatch
from anomalib.visualization import ImageVisualizer
from tqdm import tqdm

from anomalib_apc.errors import InvalidInputError, OutputExistsError

from .images import ImageReadError, list_image_files, read_image_file
from .inferencer import ApcInferencer
from .options import OVERLAY_DIR, SCORES_FILE, SearchMode
from .output_lock import LOCK_FILE, locked_output
from .pipelined import predict_pipelined

PARTIAL_SCORES_FILE = f".{SCORES_FILE}.partial"
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
        seconds: Wall time of reading, scoring and writing.
    """

    scores_file: Path
    overlay_dir: Path
    images: int
    scored: int
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Input files per second of the whole run: reading, scoring and writing."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


def predict_folder(
    bundle: str | Path | ApcInferencer,
    inputs: Sequence[str | Path],
    output: str | Path,
    batch_size: int = 8,
    search: SearchMode = "default",
    num_threads: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    throughput: bool = False,
    ov_config: Mapping[str, object] | None = None,
) -> PredictionSummary:
    """Score every image file of ``inputs`` (files, or folders searched recursively) into ``output``.

    Args:
        bundle: A bundle folder, or an ``ApcInferencer`` already loaded (then ``search`` and
            ``num_threads`` are its own).
        inputs: Image files and folders.
        output: Folder for ``scores.csv`` and ``overlays/``; held locked for the run, so that a second
            run into the same folder is refused instead of mixing its rows and overlays with these.
        batch_size: Images per inference call.
        search: Search mode of the inferencer (see ``ApcInferencer``).
        num_threads: CPU threads for OpenVINO and faiss (default: all available).
        overwrite: Replace the ``scores.csv`` and ``overlays/`` of an earlier run in ``output``.
        show_progress: Show a progress bar.
        throughput: Run the CNN of the next batches while a batch is searched and written (OpenVINO
            ``AsyncInferQueue``, compiled with the throughput hint unless ``ov_config`` sets one): the
            same rows; it pays where one request leaves cores idle (on two cores it gave 4.7-4.8
            against 5.0-5.1 images/s sequentially, ResNet-50 at 256 px).
        ov_config: OpenVINO properties for the compiled graph (see ``ApcInferencer``).

    Returns:
        The summary; ``failures`` lists the files that could not be read or scored.

    Raises:
        InvalidInputError: ``batch_size`` below 1, or a bundle that cannot be used.
        MissingInputError: An input path does not exist, or a folder holds no image.
        OutputExistsError: ``output`` is not empty and ``overwrite`` is off, it holds files that are
            not the output of an earlier prediction, or another run is writing into it now.
    """
    if batch_size < 1:
        msg = f"batch_size (--batch-size) must be at least 1, got {batch_size}."
        raise InvalidInputError(msg)
    unique: dict[Path, Path] = {}  # a file named twice (itself and inside a named folder) is scored once
    for path in list_image_files(inputs):
        unique.setdefault(_real_path(path), path)
    files = list(unique.values())
    directory = Path(output)
    if directory.exists() and not directory.is_dir():
        msg = f"{directory} exists and is not a folder; choose another --output."
        raise OutputExistsError(msg)
    _check_output(directory, overwrite)  # before the bundle is loaded; again below, once no other run can write
    hint = {"PERFORMANCE_HINT": "THROUGHPUT"} if throughput else {}
    inferencer = bundle if isinstance(bundle, ApcInferencer) else ApcInferencer(
        bundle, num_threads=num_threads, search=search, ov_config=hint | dict(ov_config or {}),
    )
    with locked_output(directory, "predict"):
        _check_output(directory, overwrite)
        _clear_output(directory)
        started = time.perf_counter()
        failures = _score_files(inferencer, files, directory, batch_size, show_progress, throughput)
        seconds = time.perf_counter() - started
    return PredictionSummary(directory / SCORES_FILE, directory / OVERLAY_DIR, len(files),
                             len(files) - len(failures), failures, seconds)


@dataclass
class _ReadBatch:
    """A batch of input files: the images read, and the rows of those that could not be read."""

    files: list[Path]
    readable: list[Path] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    rows: dict[Path, list[str]] = field(default_factory=dict)


def _read_batches(files: list[Path], batch_size: int, image_size: tuple[int, int]) -> Iterator[_ReadBatch]:
    for start in range(0, len(files), batch_size):
        batch = _ReadBatch(files[start:start + batch_size])
        for path in batch.files:
            try:
                batch.images.append(read_image_file(path, size=image_size))
                batch.readable.append(path)
            except (ImageReadError, OSError) as error:
                batch.rows[path] = _failure_row(path, str(error))
        yield batch


def _results(
    inferencer: ApcInferencer, batches: Iterator[_ReadBatch], throughput: bool,
) -> Iterator[tuple[_ReadBatch, Iterator[tuple[Path, ImageBatch | str]]]]:
    """Each batch with its images' results; in throughput mode the CNN runs ahead (``predict_pipelined``)."""
    if not throughput:
        for batch in batches:
            yield batch, _scored(inferencer, batch.readable, batch.images)
        return
    consumed: deque[_ReadBatch] = deque()

    def images() -> Iterator[list[torch.Tensor]]:
        for batch in batches:
            consumed.append(batch)
            yield batch.images

    for result in predict_pipelined(inferencer, images()):
        batch = consumed.popleft()
        if isinstance(result, Exception):  # scored again, image by image, so that only the culprit fails
            yield batch, _scored(inferencer, batch.readable, batch.images)
        else:
            yield batch, zip(batch.readable, result, strict=True)


def _score_files(
    inferencer: ApcInferencer, files: list[Path], directory: Path, batch_size: int, show_progress: bool,
    throughput: bool,
) -> list[str]:
    """Write a row for every file into ``scores.csv`` (atomically, see :class:`_ScoresFile`); the failures' messages."""
    overlay_names = _overlay_names(files)
    visualizer = ImageVisualizer()
    failures: list[str] = []
    with _ScoresFile(directory / SCORES_FILE) as scores, \
            tqdm(total=len(files), desc="Scoring images", unit="image", disable=not show_progress) as progress:
        batches = _read_batches(files, batch_size, inferencer.image_size)
        for batch, results in _results(inferencer, batches, throughput):
            rows = batch.rows
            for path, result in results:
                if isinstance(result, str):
                    rows[path] = _failure_row(path, result)
                    continue
                overlay_path = directory / OVERLAY_DIR / overlay_names[path]
                overlay_path.parent.mkdir(parents=True, exist_ok=True)
                _as_list(visualizer.visualize(result))[0].save(overlay_path)
                label = "" if result.pred_label is None else ("anomalous" if bool(result.pred_label) else "normal")
                rows[path] = [str(path), STATUS_OK, f"{float(result.pred_score):.6f}", label, str(overlay_path)]
            failures.extend(rows[path][1] for path in batch.files if rows[path][1] != STATUS_OK)
            scores.add(rows[path] for path in batch.files)
            progress.update(len(batch.files))
    return failures


def _scored(
    inferencer: ApcInferencer, paths: list[Path], images: list[torch.Tensor],
) -> Iterator[tuple[Path, ImageBatch | str]]:
    """Each image's one-item result, or the reason it could not be scored.

    The batch is scored at once; if that fails, each image alone, so that an image the inferencer
    refuses costs its own row and not its batch's.
    """
    if len(images) > 1:
        try:
            batch = inferencer.predict(images)
        except Exception:  # one image's failure must not cost the others their rows: retried one by one
            pass
        else:
            yield from zip(paths, batch, strict=True)
            return
    for path, image in zip(paths, images, strict=True):
        try:
            yield path, next(iter(inferencer.predict([image])))
        except Exception as error:  # reported in the image's row; the run goes on with the next image
            yield path, f"{path}: cannot be scored ({type(error).__name__}: {error})"


def _failure_row(path: Path, reason: str) -> list[str]:
    return [str(path), reason, "", "", ""]


class _ScoresFile:
    """``scores.csv`` as a reader always finds it complete: every version is written beside it and renamed over it.

    Rows so far are written out after the first batch, then at most every ``REWRITE_INTERVAL_S``
    seconds, and when the run ends in any way, so an interrupted run keeps what it scored (a killed
    one, all but its last few seconds) and a reader never sees half a row.
    """

    REWRITE_INTERVAL_S = 2.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[list[str]] = []
        self.written_at: float | None = None

    def __enter__(self) -> "_ScoresFile":
        self._write()
        return self

    def add(self, rows: Iterable[list[str]]) -> None:
        self.rows.extend(rows)
        if self.written_at is None or time.monotonic() - self.written_at >= self.REWRITE_INTERVAL_S:
            self._write()

    def __exit__(self, *exc_info: object) -> None:
        self._write()

    def _write(self) -> None:
        partial = self.path.with_name(PARTIAL_SCORES_FILE)
        with partial.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(SCORE_COLUMNS)
            writer.writerows(self.rows)
        os.replace(partial, self.path)
        self.written_at = None if not self.rows else time.monotonic()


def _check_output(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write into a used folder unless it holds an earlier prediction to replace."""
    if not directory.is_dir():
        return
    used = sorted(path.name for path in directory.iterdir() if path.name != LOCK_FILE)
    if used:
        if not overwrite:
            msg = (f"{directory} exists and is not empty; choose another folder "
                   "or replace its predictions (--overwrite).")
            raise OutputExistsError(msg)
        unknown = [name for name in used if name not in {SCORES_FILE, PARTIAL_SCORES_FILE, OVERLAY_DIR}]
        if unknown:
            msg = (
                f"{directory} holds files that predict did not write ({', '.join(unknown[:5])}); "
                "refusing to overwrite a folder that is not a prediction output."
            )
            raise OutputExistsError(msg)


def _clear_output(directory: Path) -> None:
    """Remove an earlier run's ``scores.csv`` and overlays, so that no stale overlay stays beside new scores."""
    (directory / SCORES_FILE).unlink(missing_ok=True)
    (directory / PARTIAL_SCORES_FILE).unlink(missing_ok=True)
    if (directory / OVERLAY_DIR).exists():
        shutil.rmtree(directory / OVERLAY_DIR)


def _overlay_names(files: Sequence[Path]) -> dict[Path, Path]:
    """Each file's overlay path under ``overlays/``: its path below the inputs' common folder, its name plus ``.png``.

    The full name is kept (``a.jpg`` -> ``a.jpg.png``), so ``a.png`` and ``a.jpg`` get two overlays,
    and the sub-folders are kept, so equal names in different folders do not collide either.
    """
    if not files:
        return {}
    resolved = {file: _real_path(file) for file in files}
    common = resolved[files[0]].parent
    while not all(path.is_relative_to(common) for path in resolved.values()):
        common = common.parent
    return {file: path.relative_to(common).with_name(path.name + OVERLAY_SUFFIX) for file, path in resolved.items()}


def _real_path(path: Path) -> Path:
    """``path`` with links resolved, or made absolute where it cannot be resolved (a link loop)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path.absolute()


def _as_list(visualization: object) -> list:
    return visualization if isinstance(visualization, list) else [visualization]
