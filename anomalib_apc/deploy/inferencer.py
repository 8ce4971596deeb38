"""``ApcInferencer``: scores images with a deployment bundle, without PyTorch Lightning or the training code.

Each stage runs where it is fastest on a CPU, and everything after the search is anomalib's own code,
so that results equal the Lightning model's:

1. pre-processing: the model's anomalib ``PreProcessor`` transform, rebuilt from the metadata;
2. the CNN (encoder stages and PatchCore's local aggregation): OpenVINO, any batch size;
3. the nearest memory-bank row of every patch: faiss (``anomalib_apc.deploy.search``);
4. the image score: anomalib's ``PatchcoreModel.compute_anomaly_score`` (re-weighting of the most
   anomalous patch by its neighbourhood in the memory bank), run against the faiss memory bank, so
   the neighbour search of the re-weighting only runs for that one patch per image;
5. the anomaly map: anomalib's PatchCore ``AnomalyMapGenerator`` (upsampling, Gaussian sigma 4);
6. normalisation and labels: anomalib's ``PostProcessor`` with the thresholds and min/max of training.

The result is an anomalib ``ImageBatch``, which anomalib's visualizer and metrics take as they are.
"""

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import openvino as ov
import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2.functional import resize

from anomalib_apc.errors import InvalidInputError, check_choice

from .checksums import verify_checksums
from .images import ImageInput, resize_unit_image, to_image_tensors
from .metadata import (
    DEFECT_PROBABILITY_OUTPUT,
    GRAPH_FILE,
    GRAPH_OUTPUT,
    MEMORY_BANK_FILE,
    METADATA_FILE,
    BundleMetadata,
    read_metadata,
)
from .options import SEARCH_MODES, SearchMode
from .search import (
    ApproximateSearch,
    BoundedExactSearch,
    BoundProjection,
    BruteForceSearch,
    NearestNeighbourSearch,
    apply_search_parameters,
    flat_vectors,
)

logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (a container's limit, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PreparedImages:
    """A batch ready for the graph, with what the result needs to show it.

    Attributes:
        images: RGB ``(B, 3, H, W)`` in ``[0, 1]`` at the model's input size, for visualisation.
        model_inputs: The same after the model's pre-processing (normalised), for the graph.
        paths: The file of each image, or ``None`` where an image was not given as a file.
    """

    images: torch.Tensor
    model_inputs: torch.Tensor
    paths: list[str | None]


class MemoryBankScoring:
    """The parts of anomalib's ``PatchcoreModel`` that its image-score re-weighting reads, on faiss.

    ``PatchcoreModel.compute_anomaly_score`` reads ``num_neighbors``, ``memory_bank``,
    ``nearest_neighbors`` and ``euclidean_dist`` from its model; this object provides them from the
    bundle's exact faiss index, and ``image_scores`` runs anomalib's method on it, so the score is
    PatchCore's formula itself rather than a copy of it.
    """

    euclidean_dist = staticmethod(PatchcoreModel.euclidean_dist)

    def __init__(self, memory_bank: faiss.IndexFlatL2, num_neighbors: int) -> None:
        self.index = memory_bank
        self.memory_bank = torch.from_numpy(flat_vectors(memory_bank))  # a view: the index's rows, not a copy
        self.num_neighbors = num_neighbors

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances and ids of the ``n_neighbors`` nearest memory-bank rows, as ``PatchcoreModel`` returns them."""
        squared, ids = self.index.search(np.ascontiguousarray(embedding.numpy(), dtype=np.float32), n_neighbors)
        return torch.from_numpy(np.sqrt(squared.clip(min=0))), torch.from_numpy(ids)

    def image_scores(
        self, patch_scores: torch.Tensor, locations: torch.Tensor, embedding: torch.Tensor,
    ) -> torch.Tensor:
        """PatchCore's image scores ``(B,)`` from patch scores and nearest-row ids ``(B, h*w)`` and patch rows."""
        return PatchcoreModel.compute_anomaly_score(self, patch_scores, locations, embedding)  # type: ignore[arg-type]


class ApcInferencer:
    """Scores images with a bundle written by ``export_bundle``.

    Args:
        bundle: The bundle folder.
        device: OpenVINO device for the CNN.
        num_threads: Threads for OpenVINO and faiss (faiss's setting is process-wide); default: the
            CPUs this process may use.
        search: ``"default"``: the bundle's approximate index if it has one, else exact search with
            the lower bound; ``"exact"``: exact search with the lower bound even if the bundle has
            an approximate index; ``"brute_force"``: faiss ``IndexFlatL2`` over every row.
        ov_config: OpenVINO properties for compiling the graphs, as anomalib's ``OpenVINOInferencer``
            takes them (e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}``); they override this inferencer's
            defaults (``num_threads``, the latency hint, float32 arithmetic for a float32 bundle).

    Raises:
        MissingInputError: The bundle or one of its files is missing.
        InvalidInputError: The bundle is of another format version or architecture, a file's
            SHA-256 differs from the one its metadata records (a file of another bundle), its files
            do not agree with its metadata, or its post-processor is not an anomalib ``PostProcessor``.

    Example:
        >>> inferencer = ApcInferencer("bundle")
        >>> result = inferencer.predict(["a.png", "b.png"])
        >>> result.pred_score, result.pred_label, result.anomaly_map.shape
    """

    def __init__(
        self,
        bundle: str | Path,
        device: str = "CPU",
        num_threads: int | None = None,
        search: SearchMode = "default",
        ov_config: Mapping[str, object] | None = None,
    ) -> None:
        check_choice("search", search, SEARCH_MODES)
        self.bundle = Path(bundle)
        self.ov_config = dict(ov_config or {})
        self.core = ov.Core()  # one per inferencer: both graphs are read and compiled by it
        self.metadata: BundleMetadata = read_metadata(self.bundle)
        verify_checksums(self.bundle, self.metadata.checksums, self.metadata.files())
        self.num_threads = num_threads or available_cpus()
        faiss.omp_set_num_threads(self.num_threads)
        self.graph = self._compile_graph(device)
        # With segmentation fusion the graph's second output weights the map; benchmarks and tests switch
        # it off to see PatchCore's map of the same bundle.
        self.fuse_defect_probability = self.metadata.segmentation_fusion > 0
        self.memory_bank = self._read_memory_bank()
        self.search: NearestNeighbourSearch = self._make_search(search)
        self.scoring = MemoryBankScoring(self.memory_bank, self.metadata.num_neighbors)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=self.metadata.anomaly_map_sigma)
        self.pre_processor = PreProcessor()
        self.pre_processor.load_checkpoint_config(self.metadata.pre_processor)
        self.post_processor = self._build_post_processor()
        self._noted_sizes: set[tuple[int, int]] = set()

    @property
    def image_size(self) -> tuple[int, int]:
        return self.metadata.image_size

    def _compile_graph(self, device: str) -> ov.CompiledModel:
        """Read and compile the bundle's graph, refusing one whose shapes disagree with the metadata."""
        path = self.bundle / GRAPH_FILE
        try:
            model = self.core.read_model(path)
        except RuntimeError as error:
            msg = f"{path}: OpenVINO cannot read this graph ({error})."
            raise InvalidInputError(msg) from error
        height, width = self.metadata.image_size
        expected_outputs = [ov.PartialShape([-1, *self.metadata.feature_map_size, self.metadata.embedding_dim])]
        if self.metadata.segmentation_fusion > 0:
            expected_outputs.append(ov.PartialShape([-1, 1, height, width]))
        expected_input = ov.PartialShape([-1, 3, height, width])
        input_shape = model.input(0).get_partial_shape()
        graph_outputs = [output.get_partial_shape() for output in model.outputs]
        outputs_agree = len(graph_outputs) == len(expected_outputs) and all(
            found.compatible(expected) for found, expected in zip(graph_outputs, expected_outputs, strict=True))
        if not input_shape.compatible(expected_input) or not outputs_agree:
            msg = (
                f"{path}: graph maps {input_shape} to {graph_outputs}, but the metadata says {expected_input} to "
                f"{expected_outputs}; the bundle's files do not belong together, export it again."
            )
            raise InvalidInputError(msg)
        config = {"INFERENCE_NUM_THREADS": self.num_threads, "PERFORMANCE_HINT": "LATENCY",
                  **arithmetic_config(self.metadata.precision)}
        return self.core.compile_model(model, device, config | self.ov_config)

    def _read_memory_bank(self) -> faiss.IndexFlatL2:
        index = self._read_index(MEMORY_BANK_FILE)
        if not isinstance(index, faiss.IndexFlatL2):
            msg = f"{self.bundle / MEMORY_BANK_FILE}: expected an exact IndexFlatL2, found {type(index).__name__}."
            raise InvalidInputError(msg)
        return index

    def _read_index(self, name: str) -> faiss.Index:
        path = self.bundle / name
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            msg = f"{path}: faiss cannot read this index ({str(error).splitlines()[0]})."
            raise InvalidInputError(msg) from error
        expected = (self.metadata.memory_bank_size, self.metadata.embedding_dim)
        if (index.ntotal, index.d) != expected:
            msg = (f"{path}: {index.ntotal} rows of {index.d} features, but the metadata says "
                   f"{expected[0]} of {expected[1]}.")
            raise InvalidInputError(msg)
        return index

    def _make_search(self, mode: SearchMode) -> NearestNeighbourSearch:
        approximate, exact = self.metadata.approximate_search, self.metadata.exact_search
        if mode == "default" and approximate:
            index = self._read_index(approximate["file"])
            apply_search_parameters(index, approximate["search_parameters"])
            return ApproximateSearch(index, self.memory_bank, approximate["candidates"])
        if mode != "brute_force" and exact:
            projection = BoundProjection.load(self.bundle / exact["file"])
            return BoundedExactSearch(self.memory_bank, projection, exact["candidates"])
        return BruteForceSearch(self.memory_bank)

    def _build_post_processor(self) -> PostProcessor | None:
        description = self.metadata.post_processor
        if description is None:
            return None
        post_processor = self._post_processor_class(description["class_path"])()
        post_processor.load_checkpoint_config(description["config"])
        state = {
            name: torch.tensor(float("nan") if value is None else value) for name, value in description["state"].items()
        }
        post_processor.load_state_dict(state, strict=False)
        return post_processor.eval()

    def _post_processor_class(self, class_path: object) -> type[PostProcessor]:
        """The class ``class_path`` names, if it is anomalib's ``PostProcessor`` or a subclass; checked before any call.

        The metadata is a plain file that anyone may edit: an arbitrary importable callable there
        (``os.abort``) must not run.
        """
        where = f"{self.bundle / METADATA_FILE}: post_processor.class_path {class_path!r}"
        module_name, _, class_name = class_path.rpartition(".") if isinstance(class_path, str) else ("", "", "")
        if not module_name or not class_name:
            msg = f"{where} is not a dotted 'module.Class' path."
            raise InvalidInputError(msg)
        try:
            candidate = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            msg = f"{where} cannot be imported ({error})."
            raise InvalidInputError(msg) from error
        if not (isinstance(candidate, type) and issubclass(candidate, PostProcessor)):
            msg = f"{where} is not a subclass of anomalib's PostProcessor; refusing to call it."
            raise InvalidInputError(msg)
        return candidate

    def prepare(self, images: ImageInput | list[ImageInput]) -> PreparedImages:
        """Read and pre-process images as the model's pre-processor does; other sizes are resized (noted once each)."""
        tensors, paths = [], []
        for image, path in to_image_tensors(images, file_size=self.image_size):
            size = tuple(image.shape[-2:])
            if size != self.image_size:
                if size not in self._noted_sizes:
                    logger.info("Images of %dx%d pixels are resized to the model's %dx%d input.",
                                *size[::-1], *self.image_size[::-1])
                    self._noted_sizes.add(size)
                image = resize_unit_image(image, self.image_size)
            tensors.append(image)
            paths.append(path)
        batch = torch.stack(tensors)
        model_inputs = self.pre_processor.transform(batch)
        if tuple(model_inputs.shape[-2:]) != self.image_size:  # a pre-processor that crops
            model_inputs = resize(model_inputs, list(self.image_size), antialias=True)
        return PreparedImages(batch, model_inputs, paths)

    def embed(self, model_inputs: torch.Tensor) -> np.ndarray:
        """Patch rows ``(B, h, w, D)`` of pre-processed images, from the OpenVINO graph."""
        return self.graph(graph_input(model_inputs))[GRAPH_OUTPUT]

    def score(self, model_inputs: torch.Tensor) -> InferenceBatch:
        """Raw PatchCore scores ``(B,)`` and anomaly maps ``(B, 1, H, W)`` of pre-processed images.

        The same values as ``AnomalousPatchCoreModel`` returns in eval mode, before normalisation.
        """
        return self.score_graph_outputs(self.graph(graph_input(model_inputs)))

    def score_graph_outputs(self, outputs: Mapping[str, np.ndarray]) -> InferenceBatch:
        """``score`` from the graph's outputs (by name), for callers that run the graph themselves (asynchronously)."""
        patches = outputs[GRAPH_OUTPUT]
        batch_size, height, width, dim = patches.shape
        rows = patches.reshape(-1, dim)
        squared_distances, nearest_ids = self.search.nearest(rows)
        patch_scores = torch.from_numpy(np.sqrt(squared_distances)).reshape(batch_size, height * width)
        locations = torch.from_numpy(nearest_ids).reshape(batch_size, height * width)
        pred_score = self.scoring.image_scores(patch_scores, locations, torch.from_numpy(rows))
        anomaly_map = self.anomaly_map_generator(patch_scores.reshape(batch_size, 1, height, width), self.image_size)
        if self.fuse_defect_probability:  # segmentation_fusion: as AnomalousPatchCoreModel.forward
            probability = torch.from_numpy(outputs[DEFECT_PROBABILITY_OUTPUT])
            anomaly_map = anomaly_map * probability.pow(self.metadata.segmentation_fusion)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def post_process(self, raw: InferenceBatch) -> InferenceBatch:
        """anomalib's normalisation and thresholds (the model's post-processor), or the raw values without one."""
        if self.post_processor is None:
            return raw
        with torch.no_grad():
            return self.post_processor(raw)

    def predict(self, images: ImageInput | list[ImageInput]) -> ImageBatch:
        """Score, label and anomaly map of one image or a batch.

        Args:
            images: A file path, PIL image, ``(H, W[, C])`` array or ``(C, H, W)`` tensor in ``[0, 1]``;
                a list of them; or a ``(B, C, H, W)`` tensor.

        Returns:
            anomalib ``ImageBatch`` with ``image`` (RGB at the model's input size), ``image_path`` (when
            every image came from a file), ``pred_score``, ``pred_label``, ``anomaly_map`` and
            ``pred_mask``, normalised and thresholded as anomalib's post-processor does.

        Raises:
            MissingInputError: An image file does not exist.
            ImageReadError: An image cannot be read or has an unusable shape; the message names it.
        """
        prepared = self.prepare(images)
        with torch.no_grad():
            result = self.post_process(self.score(prepared.model_inputs))
        return image_batch(prepared, result)


def image_batch(prepared: PreparedImages, result: InferenceBatch) -> ImageBatch:
    """The ``ImageBatch`` that ``predict`` returns, of prepared images and their post-processed results."""
    paths = prepared.paths
    return ImageBatch(
        image=prepared.images,
        image_path=[str(path) for path in paths] if all(path is not None for path in paths) else None,
        pred_score=result.pred_score,
        pred_label=result.pred_label,
        anomaly_map=result.anomaly_map,
        pred_mask=result.pred_mask,
    )


def arithmetic_config(precision: str) -> dict[str, object]:
    """OpenVINO properties that keep a graph's float layers in float32 where a CPU would default to
    bfloat16 (parity with the PyTorch model): for every precision but ``int8``, whose few float layers
    are left to the CPU; ``int8-acq`` keeps layers in float for accuracy, so they stay float32."""
    return {} if precision == "int8" else {"INFERENCE_PRECISION_HINT": "f32"}


def graph_input(model_inputs: torch.Tensor) -> np.ndarray:
    """Pre-processed images as the OpenVINO graphs take them: a contiguous float32 array."""
    return np.ascontiguousarray(model_inputs.numpy(), dtype=np.float32)
