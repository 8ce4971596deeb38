"""Export of a trained AnomalousPatchCore as a deployment bundle.

A bundle is a folder that ``ApcInferencer`` runs without Lightning, the training code or a GPU:

- ``embedding.xml`` / ``.bin``: OpenVINO IR of the fine-tuned encoder stages up to the deepest
  memory-bank layer plus PatchCore's local aggregation (3x3 average pooling, upsampling,
  concatenation: ``AnomalousPatchCoreModel.embedding_map``). Input: pre-processed images
  ``(N, 3, H, W)``, any ``N``; output: patch rows ``(N, h, w, D)``, already in the layout faiss
  searches. FP32 by default; FP16 weights, or INT8 quantised by nncf on calibration images.
- ``defect_probability.xml`` / ``.bin`` (models with ``segmentation_fusion`` only): OpenVINO IR of
  the segmentation head's defect probability ``(N, 1, H, W)``, which weights the anomaly map.
- ``memory_bank.faiss``: the memory bank as an exact faiss ``IndexFlatL2``.
- ``bound_projection.npz``: principal axes of the memory bank, with which exact search skips most
  distance computations (see ``anomalib_apc.deploy.search``).
- ``approximate_index.faiss`` (optional): an HNSW or IVF index, with its recall against exact
  search measured at export and recorded in the metadata.
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
import numpy as np
import openvino as ov
import torch
from anomalib.data import AnomalibDataModule
from anomalib.post_processing import PostProcessor
from torch import nn

from anomalib_apc import __version__
from anomalib_apc.errors import InvalidInputError, OutputExistsError, check_choice
from anomalib_apc.models import AnomalousPatchCore

from .calibration import query_patches, read_calibration_images
from .checkpoint import read_checkpoint
from .checksums import bundle_checksums
from .graph import (
    DefectProbabilityGraph,
    EmbeddingGraph,
    export_graph,
    model_input_size,
    pre_processing_transform,
)
from .inferencer import ApcInferencer
from .metadata import (
    DEFECT_GRAPH_FILE,
    DEFECT_GRAPH_OUTPUT,
    GRAPH_FILE,
    MEMORY_BANK_FILE,
    METADATA_FILE,
    BundleMetadata,
)
from .options import INDEX_TYPES, PRECISIONS, IndexType, Precision
from .parity import compare_with_model
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
    overwrite: bool = False,
) -> Path:
    """Write a deployment bundle of a trained model.

    Args:
        model: A fitted ``AnomalousPatchCore`` or the path of its Lightning checkpoint.
        output: Bundle folder to create.
        precision: ``fp32`` (parity with PyTorch), ``fp16`` (half-size weights, computed in float32
            on CPUs) or ``int8`` (nncf post-training quantisation; needs calibration images).
        index: ``flat`` (exact search only) or an approximate index used by default at inference:
            ``hnsw`` or ``ivf``. The bundle keeps the exact index either way.
        calibration_images: Folder of images (searched recursively) for INT8 calibration, recall
            measurement and the parity check; normal training images are the right choice.
        datamodule: Where to take those images from instead: its normal training images.
        max_calibration_images: Upper limit on the calibration images read.
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
    if precision == "int8":
        _require_nncf()  # before anything is read, and long before --overwrite removes the bundle there
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
    if precision == "int8" and calibration is None:
        msg = ("INT8 quantisation needs calibration images: pass calibration_images=FOLDER (--calibration-images) "
               "or a datamodule.")
        raise InvalidInputError(msg)
    _replace_output(directory)

    model_inputs = transform(calibration) if calibration is not None else None
    graph = EmbeddingGraph(torch_model).eval()
    with torch.no_grad():
        _, feature_height, feature_width, embedding_dim = graph(torch.zeros(1, 3, *image_size)).shape
    export_graph(graph, image_size, precision, model_inputs, directory / GRAPH_FILE)
    if torch_model.segmentation_fusion > 0:
        export_graph(DefectProbabilityGraph(torch_model).eval(), image_size, precision, model_inputs,
                     directory / DEFECT_GRAPH_FILE, output_name=DEFECT_GRAPH_OUTPUT)

    memory_bank = np.ascontiguousarray(torch_model.memory_bank.detach().cpu().numpy(), dtype=np.float32)
    exact_index = faiss.IndexFlatL2(memory_bank.shape[1])
    exact_index.add(memory_bank)
    faiss.write_index(exact_index, str(directory / MEMORY_BANK_FILE))
    patches = query_patches(torch_model, model_inputs)
    exact_search = export_bound(exact_index, patches, directory)
    approximate_search = None if index == "flat" else export_approximate_index(exact_index, index, patches, directory)

    provenance = {
        "backbone": torch_model.backbone,
        "layers": list(torch_model.layers),
        "versions": _versions(precision),
        "source_checkpoint": source_checkpoint,
        "verification": None,
    }
    metadata = BundleMetadata(
        num_neighbors=int(torch_model.num_neighbors),
        image_size=image_size,
        embedding_dim=int(embedding_dim),
        feature_map_size=(int(feature_height), int(feature_width)),
        memory_bank_size=int(memory_bank.shape[0]),
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


def _require_nncf() -> None:
    """Refuse INT8 where nncf, its quantiser, is not installed (an optional dependency)."""
    try:
        import nncf  # noqa: F401
    except ImportError as error:
        msg = ("INT8 bundles are quantised by nncf, which is not installed: pip install 'anomalib-apc[quantization]' "
               "(or choose --precision fp32/fp16).")
        raise InvalidInputError(msg) from error


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
    if precision == "int8":
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
