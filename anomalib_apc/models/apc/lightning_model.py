"""AnomalousPatchCore: PatchCore whose feature extractor is first fine-tuned on normal and a few anomalous images.

Training runs in two phases inside one ``Engine.fit`` / ``anomalib train``:

1. ``finetune_epochs`` epochs of supervised fine-tuning: the encoder, a U-Net decoder and the enabled
   auxiliary heads (classification, segmentation, reconstruction) are trained with AdamW on the
   datamodule's training batches, which carry normal and anomalous images with their masks
   (see ``anomalib_apc.data.SupervisedMVTecAD``).
2. After the last epoch the decoder and heads are left aside; the fine-tuned encoder embeds the
   NORMAL training images only (the datamodule's ``normal_train_dataloader`` when it has one), and a
   k-center-greedy coreset of their locally aware patches becomes PatchCore's memory bank.

Inference, scores and anomaly maps are PatchCore's, returned as anomalib's ``InferenceBatch`` so that
anomalib's post-processor, evaluator and visualizer work unchanged.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_apc.data import SupervisedMVTecAD
    >>> from anomalib_apc.models import AnomalousPatchCore
    >>> datamodule = SupervisedMVTecAD(root="./datasets/MVTecAD", category="pill", num_anomalies=10)
    >>> Engine().train(model=AnomalousPatchCore(finetune_epochs=50), datamodule=datamodule)
"""

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.models.image.patchcore.lightning_model import Patchcore
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.utils.data import DataLoader

from anomalib_apc.contracts import annotations_of
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.sampling import DEFAULT_CHUNK_ROWS, CoresetSampler, PatchStorage

from .checks import (
    NO_ANOMALIES_MESSAGE,
    NOT_FITTED_MESSAGE,
    FineTuneScope,
    check_training_arguments,
    check_training_masks,
    training_labels,
)
from .decoder import DecoderType
from .distributed import step_without_update
from .finetuning_checkpoint import FineTuningCheckpoint, keep_the_trained_model
from .interruption import InterruptionGuard, stop_if_terminated
from .loss import ApcLoss, BoxSupervision, LabelSupervision
from .memory_bank import CoresetOptions, build_memory_bank_on_all_ranks
from .normal_images import normal_training_dataloader, training_anomaly_count
from .precision import FineTunePrecision, finetune_autocast, full_precision, resolve_finetune_precision
from .torch_model import TASKS, AnomalousPatchCoreModel

logger = logging.getLogger(__name__)

class AnomalousPatchCore(MemoryBankMixin, AnomalibModule):
    """AnomalousPatchCore (APC) Lightning module.

    Args:
        backbone: timm CNN name; ResNet-50 as in the paper, any timm CNN with ``feature_info`` works.
        layers: Encoder stages feeding the memory bank (``feature_info`` module names).
        pre_trained: Initialise the encoder with timm's ImageNet weights (needs the hub or its cache).
        init_weights: Local checkpoint to initialise the encoder from instead: torchvision or timm state
            dict, MoCo v3 checkpoint (the paper's initialisation), or named weights from the package registry
            (``"craft-vgg16-bn"``, :mod:`anomalib_apc.named_weights`). When these initial weights cannot
            be had (hub or registry unreachable, file missing) the model is still built, with a warning, so that a
            trained checkpoint can be loaded on a machine without them; training raises the error.
        init_weights_key_map: Regex -> replacement pairs applied to the checkpoint's key names first.
        decoder: ``"unet2"`` (skips from the memory-bank stages, the paper's choice) or ``"unet4"``.
        tasks: Auxiliary tasks, a subset of ``("classification", "segmentation", "reconstruction")``.
            Empty (or ``finetune_epochs=0``) gives plain PatchCore on the initial weights.
        loss_weights: Weights of the classification, segmentation and reconstruction losses, in that
            order (a disabled task's weight is unused).
        box_supervision: Training anomalies known by boxes: outside them pixels are normal; the segmentation
            loss ``"ignore"``s the pixels inside or targets 0.5 there (``"soft"``), see :mod:`.loss`.
        label_supervision: Training anomalies known by their label alone: no segmentation loss (``"none"``)
            or their largest segmentation logit trained as the label (``"max"``).
        finetune_epochs: Epochs of fine-tuning before the memory bank is built.
        finetune_scope: What the fine-tuning may change. ``"all"`` (the method): every weight of the
            encoder, decoder and heads, by AdamW on the task losses. ``"batchnorm_statistics"``: the
            control that separates batch-norm adaptation from the auxiliary tasks. The same batches
            and epochs pass through the encoder in train mode, so its batch-norm running means and
            variances adapt to the training data, but nothing is optimised: no loss, no optimizer, no
            weight changes. What it gains over plain PatchCore is what the data alone does; what
            ``"all"`` gains over it is what the auxiliary tasks add.
        learning_rate: AdamW learning rate of the fine-tuning.
        weight_decay: AdamW weight decay of the fine-tuning.
        coreset_sampling_ratio: Fraction of normal patches kept in the memory bank.
        num_neighbors: Memory-bank neighbours used for PatchCore's score re-weighting: at least 1, and
            at most the memory bank's rows (checked when phase 2 has built it, before validation).
        coreset_seed: Seed of the coreset selection, so that the same features give the same memory
            bank whatever happened to the global random state; ``None`` uses the global state.
        coreset_sampler: ``"exact"`` (anomalib's greedy, fast), ``"chunked"`` (greedy per chunk of
            ``coreset_chunk_rows`` rows, for banks of a million patches) or ``"auto"``: exact up to a size
            fixed by rows and ratio alone (see :mod:`anomalib_apc.sampling.selection`), so it is reproducible.
        coreset_chunk_rows: Rows per chunk of the chunked sampler (larger: closer to exact, slower).
        patch_storage: Where the normal patches wait for the coreset: ``"memory"``, ``"disk"`` (a
            memory-mapped temporary file) or ``"auto"`` (disk when they would fill half the free memory).
        reestimate_batchnorm: Before phase 2, re-estimate the encoder's batch-norm running statistics on
            the real normal training images (one pass, no weight changes), so that the memory bank and
            the test see the normalisation of normal images rather than that of the fine-tuning
            batches, half of them anomalous (see :mod:`.memory_bank`). ``False`` is the paper.
        segmentation_fusion: Exponent ``w`` of the trained segmentation head's defect probability ``p``
            in the anomaly map, which becomes PatchCore's map times ``p ** w`` (the image score stays the
            memory bank's). 0 keeps PatchCore's map, as the paper; needs the segmentation task and
            fine-tuning.
        seed: Seed of the network's initial weights (the random encoder of ``pre_trained=False``, the
            decoder and the heads), so that a run is reproducible whatever the global random state:
            anomalib 2.7's CLI parses ``seed_everything`` but never applies it. ``None`` draws them from
            the global generators (as seeded by ``lightning.seed_everything``, for instance).
        finetune_precision: Numeric precision of the fine-tuning steps: ``"auto"`` (bfloat16 autocast
            where the device computes it natively, AVX-512 BF16 / AMX CPUs and recent GPUs; float32
            elsewhere), ``"32"`` or ``"bf16-mixed"``. The memory bank, coreset and scores are always
            float32 (see :mod:`.precision`).
        channels_last: Fine-tune in channels-last memory layout (faster convolutions on CPU and GPU);
            phase 2 and inference run in the standard layout either way.
        checkpoint_every_n_epochs: Save the fine-tuning state every this many epochs of phase 1, to resume
            a killed run with ``--ckpt_path`` (see :mod:`.finetuning_checkpoint`); 0: no such checkpoints.
        pre_processor: Pre-processor instance or flag to use the default (resize to 256, ImageNet
            normalisation).
        post_processor: Post-processor instance or flag to use the default.
        evaluator: Evaluator instance or flag to use the default.
        visualizer: Visualizer instance or flag to use the default.
    """

    trains_on_anomalous_images = True
    """An ``anomalib_apc.contracts.AnomalyTrainee``: supervised datamodules serve it their batches with anomalies."""

    def __init__(
        self,
        backbone: str = "resnet50",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        init_weights: str | Path | None = None,
        init_weights_key_map: dict[str, str] | None = None,
        decoder: DecoderType = "unet2",
        tasks: Sequence[str] = TASKS,
        loss_weights: Sequence[float] = (10.0, 1.0, 1.0),
        box_supervision: BoxSupervision = "ignore",
        label_supervision: LabelSupervision = "none",
        finetune_epochs: int = 50,
        finetune_scope: FineTuneScope = "all",
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-2,
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        coreset_seed: int | None = 0,
        coreset_sampler: CoresetSampler = "auto",
        coreset_chunk_rows: int = DEFAULT_CHUNK_ROWS,
        patch_storage: PatchStorage = "auto",
        reestimate_batchnorm: bool = False,
        segmentation_fusion: float = 0.0,
        seed: int | None = 0,
        finetune_precision: FineTunePrecision = "auto",
        channels_last: bool = True,
        checkpoint_every_n_epochs: int = 5,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        check_training_arguments(loss_weights, finetune_epochs, finetune_scope, coreset_sampling_ratio,
                                 segmentation_fusion, checkpoint_every_n_epochs)
        network = {"backbone": backbone, "layers": layers, "decoder": decoder, "tasks": tasks,
                   "num_neighbors": num_neighbors, "segmentation_fusion": segmentation_fusion}
        self.model, self._initial_weights_error = AnomalousPatchCoreModel.seeded(
            seed, pre_trained=pre_trained, init_weights=init_weights, init_weights_key_map=init_weights_key_map,
            **network,
        )
        self.loss = ApcLoss(dict(zip(TASKS, loss_weights, strict=True)), box_supervision, label_supervision)
        self.finetune_epochs = finetune_epochs
        self.finetune_scope = finetune_scope
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.coreset = CoresetOptions(coreset_sampling_ratio, coreset_seed, coreset_sampler, patch_storage,
                                      coreset_chunk_rows)  # checked there
        self.reestimate_batchnorm = reestimate_batchnorm
        resolve_finetune_precision(finetune_precision, torch.device("cpu"))  # refuse an unknown name now
        self.finetune_precision = finetune_precision
        self.channels_last = channels_last
        self.checkpoint_every_n_epochs = checkpoint_every_n_epochs
        self._finetune_precision_in_use = "32"
        self._anomalous_samples_seen = 0
        self._activity: str | None = None

    @property
    def fine_tunes(self) -> bool:
        """Whether phase 1 trains anything (some task enabled and at least one epoch)."""
        return bool(self.model.tasks) and self.finetune_epochs > 0

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        center_crop_size: tuple[int, int] | None = None,
    ) -> PreProcessor:
        """PatchCore's pre-processor: resize (256 by default), optional centre crop, ImageNet normalisation."""
        return Patchcore.configure_pre_processor(image_size=image_size, center_crop_size=center_crop_size)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's default post-processor (adaptive F1 threshold, min-max normalisation)."""
        return PostProcessor()

    def configure_callbacks(self) -> list[Callback]:
        """anomalib's component callbacks, the guard of SIGTERM / SIGINT, and the fine-tuning checkpoints."""
        callbacks = [*super().configure_callbacks(), InterruptionGuard(lambda: self._activity)]
        if self.fine_tunes and self.checkpoint_every_n_epochs:
            callbacks.append(FineTuningCheckpoint(self.checkpoint_every_n_epochs))
        return callbacks

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """AdamW over the encoder, decoder and heads; nothing to optimise without fine-tuning or for the
        ``"batchnorm_statistics"`` control."""
        if not self.fine_tunes or self.finetune_scope == "batchnorm_statistics":
            return None
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's weights replace the initial ones (a fine-tuning one's only where it is resumed)."""
        super().on_load_checkpoint(checkpoint)
        keep_the_trained_model(self, checkpoint)
        self._initial_weights_error = None

    def on_test_start(self) -> None:
        """Refuse to score without a memory bank (a fine-tuning checkpoint): resuming its training builds one."""
        if not bool(self._is_fitted):
            raise InvalidInputError(NOT_FITTED_MESSAGE)

    on_predict_start = on_test_start

    def on_fit_start(self) -> None:
        """Refuse to train from random weights that stand in for initial weights that could not be loaded."""
        if self._initial_weights_error is not None:
            raise self._initial_weights_error

    def on_train_start(self) -> None:
        """Refuse a one-class training set before spending an epoch on it; put every layer in train mode.

        Lightning keeps the train/eval mode each submodule had before ``fit``, so a model that was used
        for inference first (``model.eval()``) would otherwise fine-tune with frozen batch-norm statistics.
        """
        if not self.fine_tunes:
            return
        self.model.train()
        self._finetune_precision_in_use = resolve_finetune_precision(self.finetune_precision, self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        logger.info("Fine-tuning in precision %s%s.", self._finetune_precision_in_use,
                    ", channels-last" if self.channels_last else "")
        if training_anomaly_count(getattr(self.trainer, "datamodule", None)) == 0:
            raise InvalidInputError(NO_ANOMALIES_MESSAGE)

    def on_train_epoch_start(self) -> None:
        """Fine-tuning changes the encoder, so any memory bank built before is stale."""
        self._is_fitted = torch.tensor([False], device=self.device)
        self._anomalous_samples_seen = 0
        if self.fine_tunes:
            self._activity = f"phase 1 (fine-tuning, epoch {self.current_epoch + 1} of {self.finetune_epochs})"
        else:
            self._activity = "the pass over the training data before phase 2"

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT | None:
        """One fine-tuning step on a batch of normal and anomalous images; logs every loss term."""
        del args, kwargs
        if not self.fine_tunes:
            return step_without_update(self.device)
        labels = training_labels(batch)
        anomalous = labels.bool()
        self._anomalous_samples_seen += int(anomalous.sum())
        if self.finetune_scope == "batchnorm_statistics":
            self.model.feature_extractor.adapt_batchnorm_statistics(batch.image, self._finetune_precision_in_use,
                                                                    self.channels_last)
            return step_without_update(self.device)
        annotations = annotations_of(batch)
        if "segmentation" in self.model.tasks:
            check_training_masks(batch, anomalous, annotations)
        losses = self.finetune_losses(batch.image, labels, batch.gt_mask, annotations)
        batch_size = batch.image.shape[0]
        for name, value in losses.items():
            self.log(f"train_loss_{name}" if name != "total" else "train_loss", value, on_epoch=True, on_step=False,
                     prog_bar=name == "total", batch_size=batch_size)
        return {"loss": losses["total"]}

    def finetune_losses(
        self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None,
        annotations: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task losses of one fine-tuning forward pass, in the fine-tuning precision (see :mod:`.precision`).

        The network runs under autocast at ``finetune_precision`` (and in channels-last layout when
        ``channels_last``); the losses are computed in float32 from the heads' outputs, whatever the
        autocast around this call.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with finetune_autocast(self._finetune_precision_in_use, images.device):
            outputs = self.model.finetune_forward(images)
        with full_precision(images.device):
            return self.loss(outputs, images=images.float(), labels=labels, masks=masks, annotations=annotations)

    def on_train_epoch_end(self) -> None:
        """Check that anomalies were seen; after the last epoch build the memory bank (phase 2)."""
        if self.fine_tunes and self._anomalous_samples_seen == 0:
            raise InvalidInputError(NO_ANOMALIES_MESSAGE)
        if self.current_epoch + 1 >= self.trainer.max_epochs:
            super().on_train_epoch_end()

    def fit(self) -> None:
        """Phase 2: the memory bank from the normal training images and the fine-tuned encoder.

        A SIGTERM stops it between batches and before the coreset (see :mod:`.interruption`).
        """
        self._activity = "phase 2 (building the memory bank from the normal training images)"
        datamodule = getattr(self.trainer, "datamodule", None)
        fallback = self.trainer.train_dataloader if datamodule is None else None
        self.build_memory_bank(normal_training_dataloader(datamodule, fallback=fallback),
                               between_batches=partial(stop_if_terminated, self.trainer, self._activity))
        self._activity = None

    def build_memory_bank(self, normal_images: DataLoader, between_batches: Callable[[], None] = lambda: None) -> None:
        """Phase 2 under this model's arguments on ``normal_images``, in eval mode (see :mod:`.memory_bank`).

        ``fit`` calls it with the trainer's data; it also serves a model given fine-tuned weights from elsewhere.
        """
        was_training = self.model.training
        self.model.eval()
        transform = getattr(self.pre_processor, "transform", None)
        build_memory_bank_on_all_ranks(self.model, normal_images, transform, self.coreset, self.device,
                                       between_batches=between_batches, reestimate_batchnorm=self.reestimate_batchnorm)
        self.model.train(was_training)
        self._is_fitted = torch.tensor([True], device=self.device)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """PatchCore scores and anomaly maps for the batch, in float32 (see :mod:`.precision`)."""
        del args, kwargs
        with full_precision(batch.image.device):
            predictions = self.model(batch.image.float())
        return batch.update(**predictions._asdict())

    # A mixed ``--trainer.precision`` must not reach the scores in testing and prediction either.
    test_step = validation_step
    predict_step = validation_step

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """``finetune_epochs`` epochs (one pass without fine-tuning), validated once, after the memory bank.

        Unlike anomalib's memory-bank models it does not pin ``devices: 1``: phase 2 builds one complete
        memory bank across DDP ranks (see :mod:`.distributed`), so ``--trainer.devices N`` is the user's.
        """
        epochs = max(self.finetune_epochs, 1) if self.fine_tunes else 1
        return {"max_epochs": epochs, "check_val_every_n_epoch": epochs, "num_sanity_val_steps": 0,
                "gradient_clip_val": 0}

    @property
    def learning_type(self) -> LearningType:
        """Anomalib's one-class evaluation protocol: thresholds and metrics come from the test split."""
        return LearningType.ONE_CLASS

