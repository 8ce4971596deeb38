"""The bundle's OpenVINO graphs: the fine-tuned CNN and PatchCore's local aggregation, converted from PyTorch;
with ``segmentation_fusion``, also the segmentation head's defect probability.

Also what the graph's static input depends on: the model's pre-processing transform, the size it
brings every image to, and its normalisation (recorded for readers of the metadata).
"""

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import openvino as ov
import torch
from torch import nn

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore, AnomalousPatchCoreModel

from .metadata import GRAPH_INPUT, GRAPH_OUTPUT
from .options import Precision

logger = logging.getLogger(__name__)


class EmbeddingGraph(nn.Module):
    """The deployed CNN: ``embedding_map`` of pre-processed images, as patch rows ``(N, h, w, D)``."""

    def __init__(self, model: AnomalousPatchCoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embedding_map(images).permute(0, 2, 3, 1)


class DefectProbabilityGraph(nn.Module):
    """The segmentation head's defect probability ``(N, 1, H, W)`` of pre-processed images.

    A graph of its own, exported only for models with ``segmentation_fusion``: the encoder runs
    through every stage and the decoder, which the embedding graph (stopping at the deepest
    memory-bank stage) never needs.
    """

    def __init__(self, model: AnomalousPatchCoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.defect_probability(images, images.shape[-2:])


def pre_processing_transform(model: AnomalousPatchCore) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's pre-processor transform, which the bundle needs for its input size and normalisation."""
    transform = getattr(model.pre_processor, "transform", None)
    if transform is None:
        msg = "The model has no pre-processor transform; a bundle needs it to know the input size and normalisation."
        raise InvalidInputError(msg)
    return transform


def model_input_size(transform: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, int]:
    """The ``(H, W)`` the pre-processor makes of any image: the graph's static spatial size."""
    probes = ((480, 640), (512, 512))
    sizes = {tuple(transform(torch.zeros(1, 3, height, width)).shape[-2:]) for height, width in probes}
    if len(sizes) != 1:
        msg = (
            "The model's pre-processor does not bring every image to one size (no Resize to a fixed (H, W)); "
            "a bundle's graph needs one. Train with e.g. `configure_pre_processor(image_size=(256, 256))`."
        )
        raise InvalidInputError(msg)
    height, width = sizes.pop()
    return int(height), int(width)


def export_graph(
    graph: nn.Module,
    image_size: tuple[int, int],
    precision: Precision,
    calibration_inputs: torch.Tensor | None,
    path: Path,
    output_name: str = GRAPH_OUTPUT,
) -> None:
    """Convert the graph with a dynamic batch dimension, quantise it for INT8, save it as IR."""
    with torch.no_grad(), warnings.catch_warnings():
        # kornia's Gaussian blur (segmentation head) reads its constant kernel size while traced: harmless here
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="kornia")
        ov_model = ov.convert_model(
            graph,
            example_input=torch.zeros(2, 3, *image_size),
            input=[ov.PartialShape([-1, 3, *image_size])],
        )
    ov_model.input(0).get_tensor().set_names({GRAPH_INPUT})
    ov_model.output(0).get_tensor().set_names({output_name})
    if precision == "int8":
        import nncf

        samples = [image[None].numpy() for image in calibration_inputs]
        if len(samples) < 300:
            logger.warning("INT8 calibration on %d images; nncf recommends 300.", len(samples))
        ov_model = nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples))
    ov.save_model(ov_model, path, compress_to_fp16=precision == "fp16")
