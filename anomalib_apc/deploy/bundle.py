"""Export of a trained AnomalousPatchCore as a deployment bundle.

A bundle is a folder that ``ApcInferencer`` runs without Lightning, the training code or a GPU:

- ``embedding.xml`` / ``.bin``: OpenVINO IR of the fine-tuned encoder stages up to the deepest
  memory-bank layer plus PatchCore's local aggregation (3x3 average pooling, upsampling,
  concatenation: ``AnomalousPatchCoreModel.embedding_map``). Input: pre-processed images
  ``(N, 3, H, W)``, any ``N``; output: patch rows ``(N, h, w, D)``, already in the layout faiss
  searches. With ``segmentation_fusion``, a second output: the segmentation head's defect
  probability ``(N, 1, H, W)``, which weights the anomaly map (the encoder runs once for both).
  FP32 by default; FP16 weights, or INT8 quantised by nncf (``anomalib_apc.deploy.quantization``).
- ``memory_bank.faiss``: the memory bank as an exact faiss ``IndexFlatL2``; for INT8, recomputed by
  the quantised graph so that bank and queries share one arithmetic.
- ``bound_projection.npz``: principal axes of the memory bank, with which exact search skips most
  distance computations (see ``anomalib_apc.deploy.search``).
- ``approximate_index.faiss`` (optional): a compact index (HNSW or IVF over 8-bit codes, or a PCA
  projection) whose candidates are re-ranked against the exact rows, with its size, recall and
  largest distance error against exact search measured at export and recorded in the metadata.
- ``metadata.json``: see ``anomalib_apc.deploy.metadata.BundleMetadata``, with the SHA-256 of every
  other file and the identity of the source checkpoint.

The CNN graph is converted straight from PyTorch by OpenVINO with a dynamic batch dimension; the
search is left to faiss rather than traced into the graph, which is what fixes the batch size and
dominates the run time of anomalib's own export of PatchCore.

This module runs the export; the parts live beside it: ``checkpoint`` (reading the checkpoint),
``graph`` (the OpenVINO graph), ``calibration`` (the images), ``search_export`` (the search
structures and their measurements), ``checksums`` and ``parity`` (the check of the written bundle).
"""

import dataclasses
import logging
import shutil
from pathlib import Path

import anomalib
import faiss
import openvino as ov
import torch
from anomalib.data import AnomalibDataModule
from anomalib.post_processing import PostProcessor
from torch import nn

from anomalib_apc import __version__
from anomalib_apc.errors import InvalidInputError, OutputExistsError, check_choice
from anomalib_apc.models import AnomalousPatchCore

from .calibration import read_calibration_images, read_validation_images, sample_queries
from .checkpoint import read_checkpoint
from .checksums import bundle_checksums
from .graph import convert_graph, deployed_graph, model_input_size, pre_processing_transform
from .inferencer import ApcInferencer, arithmetic_config, graph_input
from .metadata import GRAPH_FILE, GRAPH_OUTPUT, MEMORY_BANK_FILE, METADATA_FILE, BundleMetadata
from .options import INDEX_TYPES, PRECISIONS, IndexType, Precision
from .parity import compare_with_model
from .quantization import DeployedMemoryBank, quantize_graph, recomputed_memory_bank, require_nncf
from .search import flat_index
from .search_export import export_approximate_index, export_bound

logger = logging.getLogger(__name__)

# PatchCore's anomaly-map smoothing (anomalib's AnomalyMapGenerator default, which PatchcoreModel uses).
ANOMALY_MAP_SIGMA = 4
VERIFICATION_IMAGES = 4


def export_bundle(
    model: AnomalousPatchCore | str | Path,
    output: str | Path,
    precision: Precision = "fp32",
    index: IndexType = "flat",
    calibration_images: str | Path | None = None,
    datamodule: AnomalibDataModule | None = None,
    max_calibration_images: int = 300,
    validation_images: str | Path | None = None,
    max_drop: float = 0.005,
    recompute_memory_bank: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a deployment bundle of a trained model.

    Args:
        model: A fitted ``AnomalousPatchCore`` or the path of its Lightning checkpoint.
        output: Bundle folder to create.
        precision: ``fp32`` (parity with PyTorch), ``fp16`` (half-size weights, computed in float32
            on CPUs), ``int8`` (nncf post-training quantisation; needs calibration images) or
            ``int8-acq`` (the same with nncf's accuracy control; also needs ``validation_images``).
        index: ``flat`` (exact search only) or a compact approximate index used by default at
            inference, re-ranked against the exact rows: ``hnsw`` (HNSW over 8-bit codes), ``ivf``
            (inverted lists of 8-bit codes) or ``pca`` (a scan of the rows projected on their
            principal axes). The bundle keeps the exact index either way.
        calibration_images: Folder of images (searched recursively) for INT8 calibration and the
            parity check (and the search measurements without ``validation_images``); normal training
            images are the right choice.
        datamodule: Where to take those images from instead: its normal training images.
        max_calibration_images: Upper limit on the calibration images read.
        validation_images: A folder whose ``good`` subfolder holds normal images and whose other
            subfolders hold defective ones (anomalib's ``test`` layout): what ``int8-acq`` controls the
            accuracy on, and, for any precision, the images whose patches the search's recall and the
            bound's speed are measured on (the memory bank's own images flatter an approximate index).
        max_drop: For ``int8-acq``: the largest loss of validation image AUROC (0 .. 1) allowed.
        recompute_memory_bank: For INT8: recompute the memory bank with the quantised graph (off: ship
            the float model's bank, the control that shows what the recomputation is worth).
        overwrite: Replace an existing non-empty ``output`` folder.

    Returns:
        The bundle folder.

    Raises:
        MissingInputError: The checkpoint or the calibration folder does not exist.
        OutputExistsError: ``output`` is a non-empty folder and ``overwrite`` is off.
        InvalidInputError: Not an AnomalousPatchCore checkpoint, unfitted model, unknown option,
            INT8 without calibration images, or a pre-processor that does not bring images to one size.
    """
    check_choice("precision", precision, PRECISIONS)
    check_choice("index", index, INDEX_TYPES)
    directory = Path(output)
    _check_output(directory, overwrite)
    require_nncf(precision)  # before anything is read, and long before --overwrite removes the bundle there
    if isinstance(model, str | Path):
        lightning_model, identity = read_checkpoint(model)
        source_checkpoint = identity.as_dict()
        if not bool(lightning_model._is_fitted):
            msg = (f"{model}: a fine-tuning checkpoint, taken before the memory bank was built: not deployable. "
                   "Resume its training (anomalib train ... --ckpt_path FILE) and export the checkpoint that run "
                   "writes.")
            raise InvalidInputError(msg)
    else:
        lightning_model, source_checkpoint = model.eval(), None
    torch_model = lightning_model.model
    if torch_model.memory_bank.numel() == 0:
        msg = "The model has an empty memory bank: train it (Engine.fit) before exporting a bundle."
        raise InvalidInputError(msg)
    transform = pre_processing_transform(lightning_model)
    image_size = model_input_size(transform)
    calibration = read_calibration_images(calibration_images, datamodule, image_size, max_calibration_images)
    if precision.startswith("int8") and calibration is None:
        msg = (f"--precision {precision}: INT8 quantisation needs calibration images: pass calibration_images=FOLDER "
               "(--calibration-images) or a datamodule.")
        raise InvalidInputError(msg)
    if precision == "int8-acq" and validation_images is None:
        msg = ("--precision int8-acq: accuracy control needs labelled validation images: pass "
               "validation_images=FOLDER (--validation-images) with a good/ subfolder and defect subfolders.")
        raise InvalidInputError(msg)
    validation = read_validation_images(validation_images, image_size, transform) if validation_images else None
    _replace_output(directory)

    model_inputs = transform(calibration) if calibration is not None else None
    graph, output_names = deployed_graph(torch_model)
    with torch.no_grad():
        _, embedding_dim, feature_height, feature_width = torch_model.embedding_map(
            torch.zeros(1, 3, *image_size)).shape
    ov_model = convert_graph(graph, output_names, image_size)
    memory_bank = DeployedMemoryBank.of_float_model(torch_model)
    if precision.startswith("int8"):
        ov_model = quantize_graph(ov_model, precision, model_inputs, torch_model, validation, max_drop)
    deployed = ov.Core().compile_model(ov_model, "CPU", arithmetic_config(precision))  # as the inferencer runs it
    if precision.startswith("int8") and recompute_memory_bank:
        memory_bank = recomputed_memory_bank(torch_model, deployed, model_inputs)
    ov.save_model(ov_model, directory / GRAPH_FILE, compress_to_fp16=precision == "fp16")

    exact_index = flat_index(memory_bank.rows)
    faiss.write_index(exact_index, str(directory / MEMORY_BANK_FILE))
    sample = sample_queries(lambda inputs: deployed(graph_input(inputs))[GRAPH_OUTPUT], model_inputs, validation)
    exact_search = export_bound(exact_index, sample, directory)
    approximate_search = None if index == "flat" else export_approximate_index(exact_index, index, sample, directory)

    provenance = {
        "backbone": torch_model.backbone,
        "layers": list(torch_model.layers),
        "versions": _versions(precision),
        "source_checkpoint": source_checkpoint,
        "memory_bank": memory_bank.as_dict(),
        "verification": None,
    }
    metadata = BundleMetadata(
        num_neighbors=int(torch_model.num_neighbors),
        image_size=image_size,
        embedding_dim=int(embedding_dim),
        feature_map_size=(int(feature_height), int(feature_width)),
        memory_bank_size=int(memory_bank.rows.shape[0]),
        precision=precision,
        pre_processor=lightning_model.pre_processor.checkpoint_config(),
        post_processor=_post_processor_description(lightning_model.post_processor),
        anomaly_map_sigma=ANOMALY_MAP_SIGMA,
        segmentation_fusion=float(torch_model.segmentation_fusion),
        exact_search=exact_search,
        approximate_search=approximate_search,
        checksums={},
        provenance=provenance,
    )
    metadata = dataclasses.replace(metadata, checksums=bundle_checksums(directory, metadata.files()))
    metadata.write(directory)
    verification = _verify(directory, lightning_model, calibration, image_size)
    metadata = dataclasses.replace(metadata, provenance={**provenance, "verification": verification})
    metadata.write(directory)
    logger.info("Wrote the bundle to %s.", directory)
    return directory


def _check_output(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write into a non-empty folder unless it is a bundle to overwrite."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            msg = f"{directory} exists and is not empty; choose another folder or overwrite it (--overwrite)."
            raise OutputExistsError(msg)
        if not (directory / METADATA_FILE).is_file():
            msg = f"{directory} holds files but no bundle; refusing to overwrite a folder that is not a bundle."
            raise OutputExistsError(msg)


def _replace_output(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _post_processor_description(post_processor: nn.Module | None) -> dict | None:
    """Class, configuration and statistics of an anomalib post-processor; ``None`` if it has no statistics."""
    if post_processor is None:
        return None
    if not isinstance(post_processor, PostProcessor):
        msg = f"Bundles support anomalib's PostProcessor (and subclasses), not {type(post_processor).__name__}."
        raise InvalidInputError(msg)
    if torch.isnan(post_processor.image_min) or torch.isnan(post_processor.image_max):
        logger.warning(
            "The model's post-processor has no normalisation statistics (the model was never validated): "
            "the bundle gives raw scores and no labels. Validate the model (Engine.fit with a validation set) first.",
        )
        return None
    state = {name: float(value) for name, value in post_processor.state_dict().items() if value.numel() == 1}
    return {
        "class_path": f"{type(post_processor).__module__}.{type(post_processor).__qualname__}",
        "config": post_processor.checkpoint_config(),
        "state": state,
    }


def _versions(precision: Precision) -> dict[str, str]:
    versions = {
        "anomalib_apc": __version__,
        "anomalib": anomalib.__version__,
        "openvino": ov.get_version(),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
    }
    if precision.startswith("int8"):
        import nncf

        versions["nncf"] = nncf.__version__
    return versions


def _verify(
    directory: Path, model: AnomalousPatchCore, calibration: torch.Tensor | None, image_size: tuple[int, int],
) -> dict:
    """Parity of the written bundle with the model on a few calibration images (fixed noise images without)."""
    if calibration is not None:
        images, source = calibration[:VERIFICATION_IMAGES], "calibration images"
    else:
        generator = torch.Generator().manual_seed(0)
        images, source = torch.rand(2, 3, *image_size, generator=generator), "random noise images"
    report = compare_with_model(ApcInferencer(directory), model, images)
    logger.info("Bundle against the PyTorch model on %s: %s.", source, report.summary())
    return {**report.as_dict(), "source": source}
