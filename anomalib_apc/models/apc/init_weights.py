"""Creating the timm encoder and initialising it from the hub or from a local checkpoint file.

APC's encoder is initialised from MoCo v3 weights in the paper, ImageNet weights in the ablation and
random weights in our tests, and factories often have no internet. So besides timm's hub weights this
module reads the checkpoint formats people actually have on disk: torchvision and timm state dicts,
MoCo v3 training checkpoints and, through a user-given key mapping, anything else. A checkpoint that
does not fit the architecture is refused instead of silently leaving the encoder half random.
"""

import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 3.0
MOCO_V3_ENCODER_PREFIX = "module.base_encoder."
MOCO_V3_PROJECTION_PREFIX = "fc."
DATA_PARALLEL_PREFIX = "module."
CHECKPOINT_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")


class PretrainedWeightsUnavailableError(RuntimeError):
    """Raised when hub weights were asked for but cannot be had (offline, not cached)."""


class IncompatibleCheckpointError(ValueError):
    """Raised when a checkpoint's tensors do not fit the encoder architecture."""


@dataclass(frozen=True)
class InitWeightsReport:
    """What loading a checkpoint did: tensor names loaded, left missing and ignored."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def create_encoder_backbone(
    backbone: str,
    pre_trained: bool,
    init_weights: str | Path | None = None,
    init_weights_key_map: Mapping[str, str] | None = None,
) -> nn.Module:
    """Create a timm CNN without its classifier, initialised as asked.

    Args:
        backbone: timm model name, e.g. ``"resnet50"``.
        pre_trained: Load timm's ImageNet weights from the hub (ignored when ``init_weights`` is given).
        init_weights: Local checkpoint file (torchvision, timm or MoCo v3 format).
        init_weights_key_map: Regular expression -> replacement pairs applied in order to the
            checkpoint's own key names before anything else, for checkpoints from other codebases.

    Returns:
        The timm model with ``reset_classifier(0)`` applied.
    """
    if init_weights is not None:
        model = _create_timm_model(backbone, pretrained=False)
        load_init_weights(model, init_weights, init_weights_key_map)
    elif pre_trained:
        model = _create_with_hub_weights(backbone)
    else:
        model = _create_timm_model(backbone, pretrained=False)
    model.reset_classifier(0)
    return model


def _create_timm_model(backbone: str, pretrained: bool) -> nn.Module:
    try:
        return timm.create_model(backbone, pretrained=pretrained)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            msg = f"Unknown timm backbone {backbone!r}; `timm.list_models()` lists the valid names."
            raise ValueError(msg) from None
        raise


def _hub_reachable() -> bool:
    """Whether a TCP connection to the model hub opens quickly.

    huggingface_hub retries an unreachable host for about a minute before failing; probing first lets
    us go straight to the local cache and fail in seconds when the weights are not there.
    """
    try:
        with socket.create_connection(HUB_HOST, timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _create_with_hub_weights(backbone: str) -> nn.Module:
    import huggingface_hub.constants

    offline = huggingface_hub.constants.HF_HUB_OFFLINE or not _hub_reachable()
    try:
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", offline):
            return _create_timm_model(backbone, pretrained=True)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - timm and the hub raise many types; all mean "no weights".
        where = "the model hub is unreachable and they are not in the local cache" if offline else str(error)
        msg = (
            f"Cannot load pretrained weights for {backbone!r}: {where}. Pass init_weights=PATH "
            "(a torchvision, timm or MoCo v3 checkpoint file; `--model.init_weights PATH` on the CLI) "
            "or pre_trained=False (`--model.pre_trained false`) for a random initialisation."
        )
        raise PretrainedWeightsUnavailableError(msg) from None


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file, unwrapping the usual training containers.

    Raises:
        FileNotFoundError: The file does not exist.
        IncompatibleCheckpointError: The file is not a readable PyTorch checkpoint or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"init_weights file not found: {path}"
        raise FileNotFoundError(msg)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle, zip and torch errors all mean "unreadable".
        msg = f"init_weights file {path} is not a readable PyTorch checkpoint: {error}"
        raise IncompatibleCheckpointError(msg) from None
    for key in CHECKPOINT_CONTAINER_KEYS:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, Mapping):
        msg = f"init_weights file {path} holds a {type(checkpoint).__name__}, not a state dict."
        raise IncompatibleCheckpointError(msg)
    state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not state_dict:
        msg = f"init_weights file {path} holds no tensors."
        raise IncompatibleCheckpointError(msg)
    return state_dict


def normalise_checkpoint_keys(
    state_dict: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to timm's names.

    The user's ``key_map`` runs first, on the names as they are in the file. Then a MoCo v3 checkpoint
    keeps only its base encoder without the projection head (the momentum encoder and the predictor
    are training-only), and a ``DataParallel`` ``module.`` prefix is removed. torchvision and timm
    ResNets share key names, so they need no renaming.
    """
    renamed = dict(state_dict)
    for pattern, replacement in (key_map or {}).items():
        compiled = re.compile(pattern)
        renamed = {compiled.sub(replacement, key): value for key, value in renamed.items()}

    if any(key.startswith(MOCO_V3_ENCODER_PREFIX) for key in renamed):
        logger.info("init_weights: MoCo v3 checkpoint, keeping the base encoder without its projection head.")
        renamed = {
            key.removeprefix(MOCO_V3_ENCODER_PREFIX): value
            for key, value in renamed.items()
            if key.startswith(MOCO_V3_ENCODER_PREFIX)
            and not key.removeprefix(MOCO_V3_ENCODER_PREFIX).startswith(MOCO_V3_PROJECTION_PREFIX)
        }
    elif all(key.startswith(DATA_PARALLEL_PREFIX) for key in renamed):
        renamed = {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in renamed.items()}
    return renamed


def load_init_weights(
    model: nn.Module,
    path: str | Path,
    key_map: Mapping[str, str] | None = None,
) -> InitWeightsReport:
    """Load a local checkpoint into a timm model, reporting and refusing what does not fit.

    The classifier is not needed (APC drops it), so its tensors are not reported as missing or
    unexpected. Every other missing or unexpected key is logged.

    Raises:
        IncompatibleCheckpointError: No tensor name matches the model, or a matching tensor has
            another shape (another architecture or depth).
    """
    state_dict = normalise_checkpoint_keys(read_checkpoint_state_dict(path), key_map)
    classifier_prefix = model.default_cfg.get("classifier", "fc") + "."
    model_state = {key: value for key, value in model.state_dict().items() if not key.startswith(classifier_prefix)}
    checkpoint = {key: value for key, value in state_dict.items() if not key.startswith(classifier_prefix)}

    matching = [key for key in checkpoint if key in model_state]
    architecture = model.default_cfg.get("architecture", type(model).__name__)
    if not matching:
        msg = (
            f"init_weights file {path}: none of its {len(checkpoint)} tensor names match {architecture!r} "
            f"(checkpoint keys look like {sorted(checkpoint)[:3]}, the model expects {sorted(model_state)[:3]}). "
            "Pass init_weights_key_map with regex -> replacement pairs to rename them."
        )
        raise IncompatibleCheckpointError(msg)
    mismatched = [
        f"{key}: checkpoint {tuple(checkpoint[key].shape)} vs model {tuple(model_state[key].shape)}"
        for key in matching
        if checkpoint[key].shape != model_state[key].shape
    ]
    if mismatched:
        msg = (
            f"init_weights file {path} does not fit {architecture!r}: {len(mismatched)} tensors have other shapes, "
            f"e.g. {'; '.join(mismatched[:3])}. Is it a checkpoint of another backbone?"
        )
        raise IncompatibleCheckpointError(msg)

    missing = sorted(set(model_state) - set(matching))
    unexpected = sorted(set(checkpoint) - set(matching))
    model.load_state_dict({key: checkpoint[key] for key in matching}, strict=False)
    logger.info("init_weights: loaded %d tensors from %s into %s.", len(matching), path, architecture)
    if missing:
        logger.warning("init_weights: %d tensors missing from %s (left as initialised): %s", len(missing), path, missing)
    if unexpected:
        logger.warning("init_weights: %d unexpected tensors in %s (ignored): %s", len(unexpected), path, unexpected)
    return InitWeightsReport(loaded=matching, missing=missing, unexpected=unexpected)

