"""Export of a trained AnomalousPatchCore as a deployment bundle.

A bundle is a folder that ``ApcInferencer`` runs without Lightning, the training code or a GPU:

- ``embedding.xml`` / ``.bin``: OpenVINO IR of the fine-tuned encoder stages up to the deepest
  memory-bank layer plus PatchCore's local aggregation (3x3 average pooling, upsampling,
  concatenation: ``AnomalousPatchCoreModel.embedding_map``). Input: pre-processed images
  ``(N, 3, H, W)``, any ``N``; output: patch rows ``(N, h, w, D)``, already in the layout faiss
  searches. FP32 by default; FP16 weights, or INT8 quantised by nncf on calibration images.
- ``memory_bank.faiss``: the memory bank as an exact faiss ``IndexFlatL2``.
- ``bound_projection.npz``: principal axes of the memory bank, with which exact search skips most
  distance computations (see ``anomalib_apc.deploy.search``).
- ``approximate_index.faiss`` (optional): an HNSW or IVF index, with its recall against exact
  search measured at export and recorded in the metadata.
- ``metadata.json``: see ``anomalib_apc.deploy.metadata.BundleMetadata``.

The CNN graph is converted straight from PyTorch by OpenVINO with a dynamic batch dimension; the
search is left to faiss rather than traced into the graph, which is what fixes the batch size and
dominates the run time of anomalib's own export of PatchCore.
"""

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import anomalib
import faiss
import numpy as np
import openvino as ov
import torch
from anomalib.data import AnomalibDataModule
from anomalib.post_processing import PostProcessor
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from anomalib_apc import __version__
from anomalib_apc.models import AnomalousPatchCore, AnomalousPatchCoreModel
from anomalib_apc.models.apc.normal_images import normal_training_images

from .images import list_image_files, read_image_file
from .inferencer import ApcInferencer
from .metadata import (
    APPROXIMATE_INDEX_FILE,
    BOUND_PROJECTION_FILE,
    GRAPH_FILE,
    GRAPH_INPUT,
    GRAPH_OUTPUT,
    MEMORY_BANK_FILE,
    METADATA_FILE,
    BundleMetadata,
)
from .options import INDEX_TYPES, PRECISIONS, ApproximateIndexType, IndexType, Precision
from .parity import compare_with_model
from .search import (
    ApproximateSearch,
    BoundProjection,
    BruteForceSearch,
    RecallReport,
    approximate_index_recipe,
    build_approximate_index,
    measure_bound,
    flat_vectors,
    held_out_recall,
    held_out_split,
    measure_recall,
)

logger = logging.getLogger(__name__)

# Exact search's lower bound uses a sixth of the feature dimensions (256 of ResNet-50's 1,536): on
# random-init ResNet-50 features of generated images it settled 99.7 % of test patches with 16
# candidates and searched 3.7x faster than brute force, where 64 dimensions settled half of them and
# a cascade of a small and a large bound gained nothing (the top-k selection of a flat search costs
# about as much as 150 dimensions of dot products).
BOUND_DIM_FRACTION = 6
BOUND_CANDIDATES = 16
# PatchCore's anomaly-map smoothing (anomalib's AnomalyMapGenerator default, which PatchcoreModel uses).
ANOMALY_MAP_SIGMA = 4
# Patch rows used to measure recall and how often the bound settles a query.
MAX_QUERY_PATCHES = 4096
VERIFICATION_IMAGES = 4


class EmbeddingGraph(nn.Module):
    """The deployed CNN: ``embedding_map`` of pre-processed images, as patch rows ``(N, h, w, D)``."""

    def __init__(self, model: AnomalousPatchCoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embedding_map(images).permute(0, 2, 3, 1)


def load_checkpoint(path: str | Path) -> AnomalousPatchCore:
    """An AnomalousPatchCore from a Lightning checkpoint, on the CPU, in eval mode.

    The encoder's initial weights (``pre_trained``, ``init_weights``) are not loaded again: the
    checkpoint holds the fine-tuned ones, and the hub or the original weight file may be out of reach.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such checkpoint file."
        raise FileNotFoundError(msg)
    try:
        model = AnomalousPatchCore.load_from_checkpoint(path, map_location="cpu", pre_trained=False, init_weights=None)
    except (KeyError, RuntimeError, TypeError, EOFError, ValueError) as error:
        msg = f"{path}: not a loadable AnomalousPatchCore checkpoint ({type(error).__name__}: {error})."
        raise ValueError(msg) from error
    return model.eval()


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
        FileNotFoundError: The checkpoint or the calibration folder does not exist.
        FileExistsError: ``output`` is a non-empty folder and ``overwrite`` is off.
        ValueError: Unfitted model, unknown option, INT8 without calibration images, or a
            pre-processor that does not bring images to one size.
    """
    if precision not in PRECISIONS:
        msg = f"precision must be one of {list(PRECISIONS)}, got {precision!r}."
        raise ValueError(msg)
    if index not in INDEX_TYPES:
        msg = f"index must be one of {list(INDEX_TYPES)}, got {index!r}."
        raise ValueError(msg)
    directory = Path(output)
    _check_output(directory, overwrite)
    source_checkpoint = str(model) if isinstance(model, str | Path) else None
    lightning_model = load_checkpoint(model) if source_checkpoint else model.eval()
    torch_model = lightning_model.model
    if torch_model.memory_bank.numel() == 0:
        msg = "The model has an empty memory bank: train it (Engine.fit) before exporting a bundle."
        raise ValueError(msg)
    transform = _pre_processing_transform(lightning_model)
    image_size = _model_input_size(transform)
    calibration = _calibration_images(calibration_images, datamodule, image_size, max_calibration_images)
    if precision == "int8" and calibration is None:
        msg = "INT8 quantisation needs calibration images: pass calibration_images=FOLDER (--calibration-images) or a datamodule."
        raise ValueError(msg)
    _replace_output(directory)

    model_inputs = transform(calibration) if calibration is not None else None
    graph = EmbeddingGraph(torch_model).eval()
    with torch.no_grad():
        _, feature_height, feature_width, embedding_dim = graph(torch.zeros(1, 3, *image_size)).shape
    _export_graph(graph, image_size, precision, model_inputs, directory / GRAPH_FILE)

    memory_bank = np.ascontiguousarray(torch_model.memory_bank.detach().cpu().numpy(), dtype=np.float32)
    exact_index = faiss.IndexFlatL2(memory_bank.shape[1])
    exact_index.add(memory_bank)
    faiss.write_index(exact_index, str(directory / MEMORY_BANK_FILE))
    query_patches = _query_patches(torch_model, model_inputs)
    exact_search = _export_bound(exact_index, query_patches, directory)
    approximate_search = None if index == "flat" else _export_approximate_index(exact_index, index, query_patches, directory)

    metadata = BundleMetadata(
        backbone=torch_model.backbone,
        layers=list(torch_model.layers),
        num_neighbors=int(torch_model.num_neighbors),
        image_size=image_size,
        embedding_dim=int(embedding_dim),
        feature_map_size=(int(feature_height), int(feature_width)),
        memory_bank_size=int(memory_bank.shape[0]),
        precision=precision,
        pre_processor=lightning_model.pre_processor.checkpoint_config(),
        normalization=_normalization(transform),
        post_processor=_post_processor_description(lightning_model.post_processor),
        anomaly_map_sigma=ANOMALY_MAP_SIGMA,
        exact_search=exact_search,
        approximate_search=approximate_search,
        versions=_versions(precision),
        source_checkpoint=source_checkpoint,
        verification=None,
    )
    metadata.write(directory)
    verification = _verify(directory, lightning_model, calibration, image_size)
    metadata = dataclasses.replace(metadata, verification=verification)
    metadata.write(directory)
    logger.info("Wrote the bundle to %s.", directory)
    return directory


def _pre_processing_transform(model: AnomalousPatchCore) -> Callable[[torch.Tensor], torch.Tensor]:
    transform = getattr(model.pre_processor, "transform", None)
    if transform is None:
        msg = "The model has no pre-processor transform; a bundle needs it to know the input size and normalisation."
        raise ValueError(msg)
    return transform


def _model_input_size(transform: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, int]:
    """The ``(H, W)`` the pre-processor makes of any image: the graph's static spatial size."""
    sizes = {tuple(transform(torch.zeros(1, 3, height, width)).shape[-2:]) for height, width in ((480, 640), (512, 512))}
    if len(sizes) != 1:
        msg = (
            "The model's pre-processor does not bring every image to one size (no Resize to a fixed (H, W)); "
            "a bundle's graph needs one. Train with e.g. `configure_pre_processor(image_size=(256, 256))`."
        )
        raise ValueError(msg)
    height, width = sizes.pop()
    return int(height), int(width)


def _calibration_images(
    folder: str | Path | None,
    datamodule: AnomalibDataModule | None,
    image_size: tuple[int, int],
    limit: int,
) -> torch.Tensor | None:
    """RGB images ``(N, 3, H, W)`` in ``[0, 1]`` at the model's input size, or ``None`` without a source."""
    if folder is not None:
        source: Iterator[torch.Tensor] = (read_image_file(path)[None] for path in list_image_files([folder])[:limit])
    elif datamodule is not None:
        source = _datamodule_images(datamodule)
    else:
        return None
    images: list[torch.Tensor] = []
    with tqdm(total=limit, desc="Reading calibration images", unit="image") as progress:
        for batch in source:
            batch = batch[: limit - len(images)]
            images.extend(v2.functional.resize(image, list(image_size), antialias=True) for image in batch)
            progress.update(len(batch))
            if len(images) >= limit:
                break
    if not images:
        msg = f"No calibration image found in {folder or type(datamodule).__name__}."
        raise FileNotFoundError(msg)
    return torch.stack(images)


def _datamodule_images(datamodule: AnomalibDataModule) -> Iterator[torch.Tensor]:
    """The datamodule's normal training images, read as the model's memory bank reads them."""
    datamodule.setup("fit")
    return normal_training_images(datamodule)


def _check_output(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write into a non-empty folder unless it is a bundle to overwrite."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            msg = f"{directory} exists and is not empty; choose another folder or overwrite it (--overwrite)."
            raise FileExistsError(msg)
        if not (directory / METADATA_FILE).is_file():
            msg = f"{directory} holds files but no bundle; refusing to overwrite a folder that is not a bundle."
            raise FileExistsError(msg)


def _replace_output(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _export_graph(
    graph: EmbeddingGraph,
    image_size: tuple[int, int],
    precision: Precision,
    calibration_inputs: torch.Tensor | None,
    path: Path,
) -> None:
    """Convert the graph with a dynamic batch dimension, quantise it for INT8, save it as IR."""
    with torch.no_grad():
        ov_model = ov.convert_model(
            graph,
            example_input=torch.zeros(2, 3, *image_size),
            input=[ov.PartialShape([-1, 3, *image_size])],
        )
    ov_model.input(0).get_tensor().set_names({GRAPH_INPUT})
    ov_model.output(0).get_tensor().set_names({GRAPH_OUTPUT})
    if precision == "int8":
        import nncf  # noqa: PLC0415 - optional dependency, only for INT8

        samples = [image[None].numpy() for image in calibration_inputs]
        if len(samples) < 300:
            logger.warning("INT8 calibration on %d images; nncf recommends 300.", len(samples))
        ov_model = nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples))
    ov.save_model(ov_model, path, compress_to_fp16=precision == "fp16")


@torch.no_grad()
def _query_patches(model: AnomalousPatchCoreModel, model_inputs: torch.Tensor | None) -> np.ndarray | None:
    """Up to ``MAX_QUERY_PATCHES`` patch rows of the calibration images (a fixed random choice)."""
    if model_inputs is None:
        return None
    rows = torch.cat([model.patch_embeddings(batch) for batch in model_inputs.split(8)]).numpy()
    choice = np.random.default_rng(0).permutation(len(rows))[:MAX_QUERY_PATCHES]
    return np.ascontiguousarray(rows[np.sort(choice)], dtype=np.float32)


def _export_bound(exact_index: faiss.IndexFlatL2, query_patches: np.ndarray | None, directory: Path) -> dict | None:
    """Save the exact-search bound if it beats brute force on sample queries; ``None`` where it does not."""
    vectors = flat_vectors(exact_index)
    projection = BoundProjection.fit(vectors, max(1, vectors.shape[1] // BOUND_DIM_FRACTION))
    if query_patches is not None:
        index, queries, source = exact_index, query_patches, "calibration image patches"
    else:
        queries, rest = held_out_split(vectors)
        index = faiss.IndexFlatL2(vectors.shape[1])
        index.add(rest)
        source = f"{len(queries)} memory-bank rows held out of the other {len(rest)}"
    measurement = measure_bound(index, projection, queries, source, BOUND_CANDIDATES)
    if measurement.speedup <= 1:
        logger.warning("Exact search: the bound is no faster than brute force on %s (it settles %.1f %%); the "
                       "bundle searches by brute force.", source, 100 * measurement.settled_fraction)
        return None
    projection.save(directory / BOUND_PROJECTION_FILE)
    logger.info("Exact search: a %d-dimensional bound settles %.1f %% of %s, %.1fx faster than brute force.",
                projection.dim, 100 * measurement.settled_fraction, source, measurement.speedup)
    return {
        "file": BOUND_PROJECTION_FILE,
        "dim": projection.dim,
        "explained_variance": projection.explained_variance,
        "candidates": BOUND_CANDIDATES,
        "settled_fraction": measurement.settled_fraction,
        "measured_speedup_vs_brute_force": measurement.speedup,
        "measured_on": source,
    }


def _export_approximate_index(
    exact_index: faiss.IndexFlatL2,
    index_type: ApproximateIndexType,
    query_patches: np.ndarray | None,
    directory: Path,
) -> dict:
    vectors = flat_vectors(exact_index)
    recipe = approximate_index_recipe(index_type, len(vectors))
    logger.info("Building the %s index %s over %d rows.", index_type, recipe.factory, len(vectors))
    index = build_approximate_index(vectors, recipe)
    faiss.write_index(index, str(directory / APPROXIMATE_INDEX_FILE))
    if query_patches is not None:
        approximate = ApproximateSearch(index, vectors, recipe.candidates)
        report: RecallReport = measure_recall(approximate, BruteForceSearch(exact_index), query_patches, "calibration image patches")
    else:
        report = held_out_recall(vectors, recipe)
    # Misses change scores, so they are worth a warning; a perfect recall is just information.
    logger.log(
        logging.WARNING if report.recall_at_1 < 1 else logging.INFO,
        "%s index: recall@1 %.4f against exact search, nearest distances %.2e larger on average (%d queries: %s).",
        index_type, report.recall_at_1, report.mean_relative_distance_error, report.queries, report.query_source,
    )
    return {
        "file": APPROXIMATE_INDEX_FILE,
        "type": index_type,
        "factory": recipe.factory,
        "search_parameters": recipe.search_parameters,
        "candidates": recipe.candidates,
        "recall_at_1": report.recall_at_1,
        "mean_relative_distance_error": report.mean_relative_distance_error,
        "recall_queries": report.queries,
        "recall_query_source": report.query_source,
    }


def _normalization(transform: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, list[float]] | None:
    steps = getattr(transform, "transforms", [transform])
    normalize = next((step for step in steps if isinstance(step, v2.Normalize)), None)
    return None if normalize is None else {"mean": list(normalize.mean), "std": list(normalize.std)}


def _post_processor_description(post_processor: nn.Module | None) -> dict | None:
    """Class, configuration and statistics of an anomalib post-processor; ``None`` if it has no statistics."""
    if post_processor is None:
        return None
    if not isinstance(post_processor, PostProcessor):
        msg = f"Bundles support anomalib's PostProcessor (and subclasses), not {type(post_processor).__name__}."
        raise ValueError(msg)
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
        import nncf  # noqa: PLC0415 - optional dependency, only for INT8

        versions["nncf"] = nncf.__version__
    return versions


def _verify(directory: Path, model: AnomalousPatchCore, calibration: torch.Tensor | None, image_size: tuple[int, int]) -> dict:
    """Parity of the written bundle with the model on a few calibration images (fixed noise images without)."""
    if calibration is not None:
        images, source = calibration[:VERIFICATION_IMAGES], "calibration images"
    else:
        generator = torch.Generator().manual_seed(0)
        images, source = torch.rand(2, 3, *image_size, generator=generator), "random noise images"
    report = compare_with_model(ApcInferencer(directory), model, images)
    logger.info("Bundle against the PyTorch model on %s: %s.", source, report.summary())
    return {**report.as_dict(), "source": source}
