"""The bundle's OpenVINO graph: the fine-tuned CNN and PatchCore's local aggregation, converted from PyTorch;
with ``segmentation_fusion``, also the segmentation head's defect probability as a second output.

Also what the graph's static input depends on: the model's pre-processing transform, the size it
brings every image to, and its normalisation (recorded for readers of the metadata).
"""

import warnings
from collections.abc import Callable

import openvino as ov
import torch
from torch import nn

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore, AnomalousPatchCoreModel

from .metadata import DEFECT_PROBABILITY_OUTPUT, GRAPH_INPUT, GRAPH_OUTPUT


class EmbeddingGraph(nn.Module):
    """The deployed CNN: ``embedding_map`` of pre-processed images, as patch rows ``(N, h, w, D)``."""

    def __init__(self, model: AnomalousPatchCoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embedding_map(images).permute(0, 2, 3, 1)


class FusedGraph(nn.Module):
    """Patch rows ``(N, h, w, D)`` and the segmentation head's defect probability ``(N, 1, H, W)``, one encoder pass.

    The graph of a model with ``segmentation_fusion``: its decoder reads every encoder stage, the
    memory-bank stages among them, so one graph with two outputs runs the encoder once where two
    graphs would run it twice.
    """

    def __init__(self, model: AnomalousPatchCoreModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, probability = self.model.embedding_map_and_defect_probability(images, images.shape[-2:])
        return embedding.permute(0, 2, 3, 1), probability


def deployed_graph(model: AnomalousPatchCoreModel) -> tuple[nn.Module, tuple[str, ...]]:
    """The graph a bundle deploys for ``model`` and the names of its outputs."""
    if model.segmentation_fusion > 0:
        return FusedGraph(model).eval(), (GRAPH_OUTPUT, DEFECT_PROBABILITY_OUTPUT)
    return EmbeddingGraph(model).eval(), (GRAPH_OUTPUT,)


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


def convert_graph(graph: nn.Module, output_names: tuple[str, ...], image_size: tuple[int, int]) -> ov.Model:
    """The OpenVINO graph of ``graph`` with a dynamic batch dimension and named input and outputs."""
    with torch.no_grad(), warnings.catch_warnings():
        # kornia's Gaussian blur (segmentation head) reads its constant kernel size while traced: harmless here
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="kornia")
        ov_model = ov.convert_model(
            graph,
            example_input=torch.zeros(2, 3, *image_size),
            input=[ov.PartialShape([-1, 3, *image_size])],
        )
    ov_model.input(0).get_tensor().set_names({GRAPH_INPUT})
    for index, name in enumerate(output_names):
        ov_model.output(index).get_tensor().set_names({name})
    return ov_model
