"""Timing of each model's phases, as a Lightning callback, and the test predictions it records.

:class:`RunMeter` only listens to Lightning's hooks; it changes nothing on the model. The
memory-bank fit is found by its place in the training loop: anomalib's ``MemoryBankMixin`` runs
``fit()`` in the model's ``on_train_epoch_end`` of the last epoch, after the last training batch
and before ``on_train_end``.
"""

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.functional.classification import binary_roc

from anomalib_apc.benchmark.metrics import unit_interval
from anomalib_apc.benchmark.results import TestEvidence
from anomalib_apc.benchmark.settings import BenchmarkSettings
from anomalib_apc.models import AnomalousPatchCore

ROC_CURVE_POINTS = 400
"""ROC curves are thinned to about this many points: enough for a plot, small enough to keep many."""


class RunMeter(Callback):
    """Times one model's phases and records its test predictions.

    - Training passes (``training_pass_s``): from the start of each training epoch to the end of its
      last batch, data loading included; for APC that is the fine-tuning, for Patchcore the
      embedding pass of its memory bank.
    - Memory-bank fit (``fit_s``): from the end of the last training batch to the end of training,
      which holds the model's ``fit()`` (APC: embedding the normal images and the coreset;
      Patchcore: the coreset) and nothing else of note (no validation pass, no checkpoint file).
    - Inference (``inference_s``): from the start to the end of each test batch, which spans the
      pre-processor's resize and normalisation and the model's forward pass, but not the metric
      updates (this callback runs before the model's evaluator).
    """

    def __init__(self) -> None:
        super().__init__()
        self.training_pass_s = 0.0
        self.fit_s = 0.0
        self.inference_s = 0.0
        self._epoch_start = 0.0
        self._last_batch_end: float | None = None
        self._batch_start = 0.0
        self.image_paths: list[str] = []
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.anomaly_maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock of this training pass."""
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Note when the latest batch (optimiser step included) finished."""
        _wait_for_device(pl_module)
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the pass up to its last batch; what follows (the memory-bank fit) is timed apart.

        Lightning calls this before the model's own ``on_train_epoch_end``, which runs the fit.
        """
        if self._last_batch_end is not None:
            self.training_pass_s += self._last_batch_end - self._epoch_start

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The time since the last training batch is the memory-bank fit."""
        _wait_for_device(pl_module)
        if self._last_batch_end is not None:
            self.fit_s = time.perf_counter() - self._last_batch_end

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Start the clock of this test batch."""
        self._batch_start = time.perf_counter()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        """Stop the clock and keep the raw scores, maps and masks of the batch."""
        _wait_for_device(pl_module)
        self.inference_s += time.perf_counter() - self._batch_start
        self.image_paths.extend(str(path) for path in outputs.image_path)
        self.scores.append(outputs.pred_score.detach().float().cpu().flatten())
        self.labels.append(outputs.gt_label.detach().cpu().flatten().int())
        anomaly_map = outputs.anomaly_map.detach().float().cpu()
        self.anomaly_maps.append(anomaly_map.reshape(len(anomaly_map), *anomaly_map.shape[-2:]))
        if outputs.gt_mask is not None:
            mask = outputs.gt_mask.detach().cpu()
            self.masks.append(mask.reshape(len(mask), *mask.shape[-2:]).bool())

    @property
    def num_test_images(self) -> int:
        """Test images scored so far."""
        return len(self.image_paths)

    def evidence(self, example_paths: Sequence[str]) -> TestEvidence:
        """ROC curves and the scaled maps of ``example_paths`` (which must be test images)."""
        scores, labels = torch.cat(self.scores), torch.cat(self.labels)
        maps = torch.cat(self.anomaly_maps)
        masks = torch.cat(self.masks) if len(self.masks) == len(self.anomaly_maps) else None
        low, high = float(maps.min()), float(maps.max())
        scaled = (maps - low) / max(high - low, 1e-12)
        index = {path: position for position, path in enumerate(self.image_paths)}
        return TestEvidence(
            image_roc=roc_curve(scores, labels),
            pixel_roc=roc_curve(maps.flatten(), masks.flatten().int()) if masks is not None else None,
            example_maps={path: scaled[index[path]].numpy() for path in example_paths},
            example_masks={path: masks[index[path]].numpy() for path in example_paths} if masks is not None else {},
        )

    def labels_by_path(self) -> dict[str, int]:
        """Ground-truth label of every test image."""
        return dict(zip(self.image_paths, torch.cat(self.labels).tolist(), strict=True))


def _wait_for_device(module: LightningModule) -> None:
    """Let queued GPU work finish, so that a clock read afterwards includes it."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def warm_up(model: AnomalousPatchCore, settings: BenchmarkSettings) -> None:
    """Run the encoder once on a full batch before anything is timed.

    The first forward pass of a batch shape pays one-off costs (oneDNN kernel selection, memory
    pools), which would otherwise fall on whichever model runs first (Patchcore). Patchcore's
    extractor is the same network as APC's encoder, so warming one warms the shapes for both.

    The modes of the encoder's modules are restored afterwards: Lightning keeps the modes it finds, so
    an encoder left in eval mode would fine-tune with frozen batch-norm statistics.
    """
    encoder = model.model.feature_extractor
    modes = {module: module.training for module in encoder.modules()}
    images = torch.zeros(settings.eval_batch_size, 3, *settings.image_shape)
    with torch.inference_mode():
        encoder.eval()(images)
    for module, training in modes.items():
        module.training = training


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates, thinned to about ``ROC_CURVE_POINTS`` points (ends kept)."""
    if labels.min() == labels.max():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = binary_roc(unit_interval(scores), labels)  # raw scores would be squashed by a sigmoid
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_CURVE_POINTS)).round().astype(int))
    return fpr[keep].numpy(), tpr[keep].numpy()
