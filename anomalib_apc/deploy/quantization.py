"""INT8 graphs for a bundle: nncf post-training quantisation, with or without accuracy control, and a
memory bank recomputed by the quantised graph.

- ``int8``: ``nncf.quantize`` calibrated on the normal training images the memory bank came from.
- ``int8-acq``: ``nncf.quantize_with_accuracy_control``, which keeps the layers whose quantisation
  costs the most in float until the image AUROC on labelled validation images is within ``max_drop``
  of the float graph's. The AUROC is that of PatchCore's image scores: the graph's patch rows searched
  against the float memory bank (exact search, anomalib's re-weighting), as the bundle scores them.

A memory bank of float features searched with INT8 queries mixes two arithmetics: every distance then
carries the quantisation error of the query alone, the same for normal and defective patches. The
bank is therefore recomputed by the quantised graph: each memory-bank row is a patch of a normal
training image (the coreset keeps rows, it does not average them), so the row is found among the
float patches of the calibration images and replaced by the quantised graph's row of the same patch
(rows equal to each other, flat background sampled more than once, share the value found for one).
Where not every row is found (calibration images other than the training images), the float bank is
kept and the metadata says so.

nncf is an optional dependency (``anomalib-apc[quantization]``); ``require_nncf`` names it before
any work starts.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import openvino as ov
import torch
from torchmetrics.classification import BinaryAUROC
from tqdm import tqdm

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCoreModel

from .options import Precision
from .search import BruteForceSearch, flat_index

logger = logging.getLogger(__name__)

# A memory-bank row is the same patch as a calibration patch when their squared distance is below this
# fraction of the row's squared norm: float rounding between batch sizes is ~1e-12 of it, and two
# different patches of a CNN feature map differ by far more than 1e-6.
SAME_PATCH_TOLERANCE = 1e-6
NORMAL_LABEL, DEFECTIVE_LABEL = 0, 1
FLOAT_MODEL, QUANTISED_GRAPH = "float model", "quantised graph"


def require_nncf(precision: Precision) -> None:
    """Refuse an INT8 precision where nncf, its quantiser, is not installed, naming the package to install."""
    if not precision.startswith("int8"):
        return
    try:
        import nncf  # noqa: F401
    except ImportError as error:
        msg = (f"--precision {precision}: INT8 bundles are quantised by nncf, which is not installed: "
               "pip install 'anomalib-apc[quantization]' (or choose --precision fp32/fp16).")
        raise InvalidInputError(msg) from error


@dataclass(frozen=True)
class ValidationImages:
    """Labelled pre-processed images against which ``int8-acq`` controls the accuracy.

    Attributes:
        model_inputs: Pre-processed images ``(N, 3, H, W)``.
        labels: ``0`` normal, ``1`` defective, ``(N,)``; both must occur (AUROC needs both).
    """

    model_inputs: torch.Tensor
    labels: torch.Tensor


def quantize_graph(
    ov_model: ov.Model,
    precision: Precision,
    calibration_inputs: torch.Tensor,
    torch_model: AnomalousPatchCoreModel,
    validation: ValidationImages | None = None,
    max_drop: float = 0.005,
) -> ov.Model:
    """The INT8 graph of ``ov_model`` (``precision`` ``int8`` or ``int8-acq``), calibrated on ``calibration_inputs``."""
    import nncf

    calibration = nncf.Dataset([image[None].numpy() for image in calibration_inputs])
    if len(calibration_inputs) < 300:
        logger.warning("INT8 calibration on %d images; nncf recommends 300.", len(calibration_inputs))
    if precision == "int8":
        return nncf.quantize(ov_model, calibration, subset_size=len(calibration_inputs))
    if validation is None:
        msg = "--precision int8-acq needs labelled validation images (--validation-images: good/ and defect folders)."
        raise InvalidInputError(msg)
    samples = [(image[None].numpy(), int(label)) for image, label in zip(validation.model_inputs, validation.labels,
                                                                          strict=True)]
    return nncf.quantize_with_accuracy_control(
        ov_model,
        calibration,
        nncf.Dataset(samples, lambda sample: sample[0]),
        validation_fn=_image_auroc_of(torch_model),
        max_drop=max_drop,
        subset_size=len(calibration_inputs),
    )


ValidationSample = tuple[np.ndarray, int]
ValidationResult = tuple[float, list[list[np.ndarray]]]


def _image_auroc_of(
    torch_model: AnomalousPatchCoreModel,
) -> Callable[[ov.CompiledModel, Iterable[ValidationSample]], ValidationResult]:
    """nncf's validation function: image AUROC of PatchCore scores of a compiled graph's patch rows.

    It also returns each image's patch rows: an AUROC of one image means nothing, so nncf ranks the
    quantised layers by how much they change the graph's outputs (its output mode) rather than by a
    metric per image, and validates the AUROC on the whole set.
    """
    search = _exact_search(DeployedMemoryBank.of_float_model(torch_model).rows)

    def validate(compiled: ov.CompiledModel, samples: Iterable[ValidationSample]) -> ValidationResult:
        scores, labels, outputs = [], [], []
        for image, label in samples:
            patches = compiled(image)[0]
            outputs.append([patches])
            rows = patches.reshape(-1, patches.shape[-1])
            squared, ids = search.nearest(rows)
            patch_scores = torch.from_numpy(np.sqrt(squared))[None]
            scores.append(torch_model.compute_anomaly_score(patch_scores, torch.from_numpy(ids)[None],
                                                            torch.from_numpy(rows)))
            labels.append(label)
        return float(BinaryAUROC()(torch.cat(scores), torch.tensor(labels))), outputs

    return validate


@dataclass(frozen=True)
class DeployedMemoryBank:
    """The memory bank a bundle ships: the model's, or recomputed by the quantised graph.

    Attributes:
        rows: The bank to ship, ``(M, D)`` float32.
        source: ``"quantised graph"`` or ``"float model"``.
        rows_found: Memory-bank rows found among the calibration patches.
        mean_relative_change: Mean ``||int8 row - float row|| / ||float row||`` over the rows replaced.
    """

    rows: np.ndarray
    source: str
    rows_found: int
    mean_relative_change: float | None

    @classmethod
    def of_float_model(cls, torch_model: AnomalousPatchCoreModel) -> "DeployedMemoryBank":
        rows = np.ascontiguousarray(torch_model.memory_bank.detach().cpu().numpy(), dtype=np.float32)
        return cls(rows, FLOAT_MODEL, len(rows), None)

    def as_dict(self) -> dict:
        return {"source": self.source, "rows_found": self.rows_found, "mean_relative_change": self.mean_relative_change}


@torch.no_grad()
def recomputed_memory_bank(
    torch_model: AnomalousPatchCoreModel, quantised: ov.CompiledModel, calibration_inputs: torch.Tensor,
) -> DeployedMemoryBank:
    """Replace every memory-bank row by the quantised graph's row of the same calibration patch (module docstring)."""
    float_bank = DeployedMemoryBank.of_float_model(torch_model).rows
    search = _exact_search(float_bank)
    squared_norms = np.einsum("ij,ij->i", float_bank, float_bank)
    tolerance = SAME_PATCH_TOLERANCE * squared_norms
    recomputed = float_bank.copy()
    found = np.zeros(len(float_bank), dtype=bool)
    for image in tqdm(calibration_inputs, desc="Recomputing the memory bank with the INT8 graph", unit="image"):
        float_rows = torch_model.patch_embeddings(image[None]).numpy()
        squared, ids = search.nearest(float_rows)
        same = squared <= tolerance[ids]
        if not same.any():
            continue
        quantised_rows = quantised(image[None].numpy())[0].reshape(len(float_rows), -1)
        recomputed[ids[same]] = quantised_rows[same]
        found[ids[same]] = True
    _copy_to_duplicates(float_bank, recomputed, found, tolerance)
    if not found.all():
        logger.warning("INT8: %d of %d memory-bank rows are not patches of the calibration images; the bundle keeps "
                       "the float memory bank (calibrate on the training images to recompute it).",
                       int((~found).sum()), len(found))
        return DeployedMemoryBank(float_bank, FLOAT_MODEL, int(found.sum()), None)
    difference = recomputed - float_bank
    change = np.sqrt(np.einsum("ij,ij->i", difference, difference) / squared_norms.clip(min=1e-30))
    logger.info("INT8: memory bank recomputed by the quantised graph (rows moved by %.2f %% on average).",
                100 * change.mean())
    return DeployedMemoryBank(recomputed, QUANTISED_GRAPH, len(found), float(change.mean()))


def _copy_to_duplicates(
    float_bank: np.ndarray, recomputed: np.ndarray, found: np.ndarray, tolerance: np.ndarray,
) -> None:
    """Give rows equal to a found row (a bank sampled with repeats: flat background) that row's quantised value.

    Each calibration patch finds one nearest row, so of several equal rows only one is ever found.
    """
    missing = np.flatnonzero(~found)
    if not len(missing) or not found.any():
        return
    found_ids = np.flatnonzero(found)
    squared, nearest = _exact_search(float_bank[found_ids]).nearest(float_bank[missing])
    equal = squared <= tolerance[missing]
    recomputed[missing[equal]] = recomputed[found_ids[nearest[equal]]]
    found[missing[equal]] = True


def _exact_search(rows: np.ndarray) -> BruteForceSearch:
    return BruteForceSearch(flat_index(rows))  # holds the index
