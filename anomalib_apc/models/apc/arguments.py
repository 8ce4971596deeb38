"""The checks of AnomalousPatchCore's constructor arguments, run before any network is built.

Each message names the argument at fault and what it accepts, so that a bad config fails at once
instead of after an epoch of fine-tuning. The network's own arguments (backbone, layers, tasks,
``num_neighbors``, ``segmentation_fusion``) are checked where they are used, in the torch model.
"""

from collections.abc import Sequence
from typing import Literal

from anomalib_apc.errors import InvalidInputError, check_choice

from .torch_model import TASKS

FineTuneScope = Literal["all", "batchnorm_statistics"]
FINETUNE_SCOPES: tuple[str, ...] = ("all", "batchnorm_statistics")


def check_training_arguments(
    loss_weights: Sequence[float],
    finetune_epochs: int,
    finetune_scope: str,
    coreset_sampling_ratio: float,
    segmentation_fusion: float,
    checkpoint_every_n_epochs: int,
) -> None:
    """Refuse training arguments that cannot be used together.

    Raises:
        InvalidInputError: The message names the argument and the values it accepts.
    """
    if len(loss_weights) != len(TASKS) or any(weight < 0 for weight in loss_weights):
        msg = f"loss_weights must be {len(TASKS)} non-negative numbers for {list(TASKS)}, got {list(loss_weights)}."
        raise InvalidInputError(msg)
    if finetune_epochs < 0:
        msg = f"finetune_epochs must be >= 0, got {finetune_epochs}."
        raise InvalidInputError(msg)
    check_choice("finetune_scope", finetune_scope, FINETUNE_SCOPES)
    if not 0 < coreset_sampling_ratio <= 1:
        msg = f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio}."
        raise InvalidInputError(msg)
    if checkpoint_every_n_epochs < 0:
        msg = f"checkpoint_every_n_epochs must be >= 0 (0: no checkpoints), got {checkpoint_every_n_epochs}."
        raise InvalidInputError(msg)
    if segmentation_fusion > 0 and (finetune_epochs == 0 or finetune_scope != "all"):
        msg = (
            f"segmentation_fusion={segmentation_fusion} needs a trained segmentation head, but finetune_epochs="
            f"{finetune_epochs} and finetune_scope={finetune_scope!r} train none: use finetune_epochs > 0 with "
            "finetune_scope 'all', or segmentation_fusion 0."
        )
        raise InvalidInputError(msg)


POST_FINETUNING_ARGUMENTS = frozenset(
    {"reestimate_batchnorm", "segmentation_fusion", "coreset_sampler", "coreset_chunk_rows", "patch_storage"}
)
"""Constructor arguments that phase 1 never reads: models differing only in them fine-tune to the same weights.

``reestimate_batchnorm`` and the coreset's sampler, chunks and patch storage act in phase 2, ``segmentation_fusion`` at
inference; the benchmark uses this to derive such variants from APC's fine-tuned weights instead of
fine-tuning them again.
"""
