"""PyTorch model of AnomalousPatchCore (no Lightning), usable alone for export and deployment.

``AnomalousPatchCoreModel`` is anomalib's ``PatchcoreModel`` whose frozen feature extractor is
replaced by a fine-tunable timm encoder, plus the fine-tuning network (U-Net decoder and auxiliary
heads) that only exists to train that encoder. Patch embedding, nearest-neighbour scoring with
re-weighting and the anomaly map are PatchCore's own, inherited unchanged.
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import nn

from anomalib_apc.errors import InvalidInputError, MissingInputError, PretrainedWeightsUnavailableError
from anomalib_apc.sampling import seeded_global_rngs

from .decoder import DecoderType, UNetDecoder
from .encoder import TimmEncoder
from .heads import ClassificationHead, ReconstructionHead, SegmentationHead

logger = logging.getLogger(__name__)

TASKS = ("classification", "segmentation", "reconstruction")
InitialWeightsError = PretrainedWeightsUnavailableError | MissingInputError


class FineTuneOutput(NamedTuple):
    """Outputs of the enabled heads; ``None`` for a disabled task."""

    classification: torch.Tensor | None
    segmentation: torch.Tensor | None
    reconstruction: torch.Tensor | None


def validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Return ``tasks`` as a tuple, refusing names that are not APC tasks."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        msg = f"Unknown task(s) {unknown}; tasks must be a subset of {list(TASKS)}."
        raise InvalidInputError(msg)
    return tuple(dict.fromkeys(tasks))


class FineTuneNetwork(nn.Module):
    """Decoder and the enabled heads; reads the encoder's stages, returns the head outputs.

    Args:
        encoder: The shared encoder (only its ``feature_info`` is read here).
        decoder: ``"unet2"`` or ``"unet4"``.
        tasks: Enabled auxiliary tasks, a subset of ``TASKS``.
    """

    def __init__(self, encoder: TimmEncoder, decoder: DecoderType, tasks: Sequence[str]) -> None:
        super().__init__()
        self.decoder = UNetDecoder(
            stage_channels=encoder.stage_channels,
            stage_reductions=encoder.stage_reductions,
            memory_bank_indices=encoder.memory_bank_indices,
            decoder=decoder,
        )
        head_builders = {
            "classification": lambda: ClassificationHead(self.decoder.classification_channels),
            "segmentation": lambda: SegmentationHead(self.decoder.pixel_channels),
            "reconstruction": lambda: ReconstructionHead(self.decoder.pixel_channels),
        }
        self.heads = nn.ModuleDict({task: head_builders[task]() for task in validate_tasks(tasks)})

    def forward(self, stages: Sequence[torch.Tensor]) -> FineTuneOutput:
        """Run the decoder once and every enabled head on its outputs."""
        decoded = self.decoder(stages)
        inputs = {
            "classification": decoded.classification_features,
            "segmentation": decoded.pixel_features,
            "reconstruction": decoded.pixel_features,
        }
        return FineTuneOutput(*(self.heads[task](inputs[task]) if task in self.heads else None for task in TASKS))

    def segmentation_logits(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """The segmentation head alone on the decoder's pixel features (inference: no other head runs)."""
        return self.heads["segmentation"](self.decoder(stages).pixel_features)


class AnomalousPatchCoreModel(PatchcoreModel):
    """PatchCore on a fine-tuned encoder.

    Args:
        backbone: timm CNN name (``resnet50`` in the paper).
        layers: The two (or more) stages whose locally aware patches form the memory bank.
        pre_trained: Initialise the encoder with timm's ImageNet weights.
        init_weights: Local checkpoint (torchvision, timm or MoCo v3) to initialise the encoder from.
        init_weights_key_map: Regex -> replacement pairs for checkpoints from other codebases.
        decoder: ``"unet2"`` or ``"unet4"``.
        tasks: Auxiliary tasks to fine-tune with; empty means plain PatchCore on the initial weights.
        num_neighbors: Memory-bank neighbours used for PatchCore's score re-weighting, at least 1 and at
            most the memory bank's rows.
        segmentation_fusion: Exponent ``w`` of the segmentation head's defect probability ``p`` in the
            anomaly map, which becomes PatchCore's map times ``p ** w``. 0 keeps PatchCore's map (the
            paper); the image score is PatchCore's either way. Needs the segmentation task.

    Raises:
        InvalidInputError: An argument that cannot be used; the message names it.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        init_weights: str | Path | None = None,
        init_weights_key_map: Mapping[str, str] | None = None,
        decoder: DecoderType = "unet2",
        tasks: Sequence[str] = TASKS,
        num_neighbors: int = 9,
        segmentation_fusion: float = 0.0,
    ) -> None:
        if num_neighbors < 1:
            msg = f"num_neighbors must be >= 1 (memory-bank patches used to re-weight scores), got {num_neighbors}."
            raise InvalidInputError(msg)
        encoder = TimmEncoder(backbone, layers, pre_trained, init_weights, init_weights_key_map)
        # PatchcoreModel builds its own frozen timm extractor; it is replaced by the shared encoder,
        # which then is the only feature extractor of the memory bank, inference and export.
        super().__init__(layers=list(layers), backbone=backbone, pre_trained=False, num_neighbors=num_neighbors)
        self.feature_extractor = encoder
        self.tasks = validate_tasks(tasks)
        self.finetune_network = FineTuneNetwork(encoder, decoder, self.tasks) if self.tasks else None
        if segmentation_fusion < 0 or (segmentation_fusion > 0 and "segmentation" not in self.tasks):
            msg = (
                f"segmentation_fusion must be >= 0 and needs the 'segmentation' task, got {segmentation_fusion} "
                f"with tasks {list(self.tasks)}."
            )
            raise InvalidInputError(msg)
        self.segmentation_fusion = segmentation_fusion


    @classmethod
    def seeded(
        cls,
        seed: int | None,
        pre_trained: bool,
        init_weights: str | Path | None,
        init_weights_key_map: Mapping[str, str] | None,
        **network: Any,
    ) -> tuple["AnomalousPatchCoreModel", InitialWeightsError | None]:
        """The network under ``seeded_global_rngs(seed)``, and the error of initial weights that could not be had.

        A checkpoint (``anomalib test/export --ckpt_path``, ``load_from_checkpoint``) replaces the initial
        weights anyway, so their absence (hub unreachable, ``init_weights`` file missing) only matters for
        training: the network is then built on random weights and the error handed back, for the Lightning
        module to raise when training starts.

        Args:
            seed: Seed of every random initial weight; ``None`` draws from the global generators.
            pre_trained: Start the encoder from timm's ImageNet weights.
            init_weights: Local checkpoint to start the encoder from.
            init_weights_key_map: Regex -> replacement pairs for the checkpoint's key names.
            network: The other constructor arguments.
        """
        try:
            with seeded_global_rngs(seed):
                model = cls(pre_trained=pre_trained, init_weights=init_weights,
                            init_weights_key_map=init_weights_key_map, **network)
        except (PretrainedWeightsUnavailableError, MissingInputError) as error:
            with seeded_global_rngs(seed):
                model = cls(pre_trained=False, init_weights=None, **network)
            logger.warning(
                "%s The encoder starts from random weights for now: loading a checkpoint works, training "
                "will stop with this error.", error,
            )
            return model, error
        return model, None
    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """PatchCore's forward; in inference with ``segmentation_fusion`` its map weighted by the defect probability.

        The memory bank alone decides the image score (detection); the segmentation head, trained on
        the real defect masks, sharpens where in the image the map responds (localisation).
        """
        predictions = super().forward(images)
        if self.training or self.segmentation_fusion == 0:
            return predictions
        weight = self.defect_probability(images, predictions.anomaly_map.shape[-2:]).pow(self.segmentation_fusion)
        return predictions._replace(anomaly_map=predictions.anomaly_map * weight)

    def defect_probability(self, images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The segmentation head's defect probability ``(B, 1, *size)`` (bilinear to the anomaly map's size)."""
        self._require_segmentation_head()
        return self._defect_probability_of(self.feature_extractor.forward_all_stages(images), size)

    def embedding_map_and_defect_probability(
        self, images: torch.Tensor, size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embedding_map`` and ``defect_probability`` from one pass through the encoder.

        The memory-bank stages are among the stages the decoder reads, so a deployed model with
        ``segmentation_fusion`` needs the encoder once, not once per output.
        """
        self._require_segmentation_head()
        stages = self.feature_extractor.forward_all_stages(images)
        encoder = self.feature_extractor
        features = {layer: stages[index] for layer, index in zip(encoder.memory_bank_layers,
                                                                  encoder.memory_bank_indices, strict=True)}
        return self._embedding_of(features), self._defect_probability_of(stages, size)

    def _require_segmentation_head(self) -> None:
        if self.finetune_network is None or "segmentation" not in self.finetune_network.heads:
            msg = "This model has no segmentation head (tasks without 'segmentation')."
            raise RuntimeError(msg)

    def _defect_probability_of(self, stages: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        logits = self.finetune_network.segmentation_logits(stages)
        return torch.sigmoid(nn.functional.interpolate(logits, size=tuple(size), mode="bilinear"))

    def finetune_forward(self, images: torch.Tensor) -> FineTuneOutput:
        """Head outputs for a batch of pre-processed images, with gradients through the encoder."""
        if self.finetune_network is None:
            msg = "This model has no auxiliary task, so there is nothing to fine-tune (tasks=())."
            raise RuntimeError(msg)
        return self.finetune_network(self.feature_extractor.forward_all_stages(images))

    def embedding_map(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(B, D, h, w)``: 3x3-pooled memory-bank stages, upsampled and joined."""
        return self._embedding_of(self.feature_extractor(images))

    def _embedding_of(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = {layer: self.feature_pooler(feature) for layer, feature in features.items()}
        return self.generate_embedding(pooled)

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PatchCore's search; in one piece while exported, where its chunk loop would fix the batch size.

        anomalib searches 1,024 patches at a time; ``torch.export`` unrolls that loop for the example
        batch, so the exported graph (``anomalib export``) refused every other batch size at 256 px.
        """
        if torch.compiler.is_exporting():
            distances = self.euclidean_dist(embedding, self.memory_bank)
            if n_neighbors == 1:
                return distances.min(1)
            return distances.topk(k=n_neighbors, largest=False, dim=1)
        return super().nearest_neighbors(embedding, n_neighbors)

    @torch.no_grad()
    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch as rows ``(B * h * w, D)``, the memory bank's unit."""
        return self.reshape_embedding(self.embedding_map(images))

    def check_normal_patches(self, patches: int, sampling_ratio: float) -> None:
        """Refuse, before the coreset, a memory bank that would be empty or smaller than ``num_neighbors``.

        Both samplers keep ``int(patches * sampling_ratio)`` rows.

        Raises:
            InvalidInputError: No normal patch at all (no normal training image reached phase 2), or
                fewer rows than ``num_neighbors`` (scoring would fail in validation).
        """
        if patches == 0:
            msg = (
                "The memory bank would be empty: no normal training image was embedded. The training "
                "set must contain normal images (label 0); check the datamodule's train split."
            )
            raise InvalidInputError(msg)
        rows = int(patches * sampling_ratio)
        if rows < self.num_neighbors:
            msg = (
                f"num_neighbors={self.num_neighbors} exceeds the memory bank's {rows} rows "
                f"({patches} normal patches, coreset_sampling_ratio={sampling_ratio}): lower "
                "num_neighbors, raise coreset_sampling_ratio or train on more normal images."
            )
            raise InvalidInputError(msg)
