"""Reading the Lightning checkpoint that a bundle is exported from, with a one-line error for a wrong file.

The file is read once: its bytes are hashed (the bundle records which checkpoint it came from) and
unpickled with ``weights_only=True`` first, so that random bytes, a pickle that would run code when
loaded, or a checkpoint of another model are refused with a message naming the file and the
problem, before anomalib builds a model from it.
"""

import hashlib
import inspect
import io
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib import PrecisionType
from anomalib.models import Patchcore

from anomalib_apc.errors import InvalidInputError, MissingInputError
from anomalib_apc.models import AnomalousPatchCore

# Plain enums that anomalib writes into checkpoints (``Patchcore``'s hyper-parameters hold one);
# allowed so that such a checkpoint is recognised as another model instead of refused as unsafe.
SAFE_CHECKPOINT_GLOBALS = [PrecisionType]
# Settings that AnomalousPatchCore has and PatchCore has not: a checkpoint without any of them is
# of another model.
APC_ONLY_HYPER_PARAMETERS = frozenset(inspect.signature(AnomalousPatchCore.__init__).parameters) - frozenset(
    inspect.signature(Patchcore.__init__).parameters,
)


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which checkpoint a bundle was exported from, as ``metadata.json`` records it.

    Attributes:
        path: The path it was read from.
        name: Its file name.
        sha256: SHA-256 of its bytes.
        epoch: Lightning's epoch counter when it was saved (``None`` if absent).
        global_step: Lightning's optimiser-step counter when it was saved (``None`` if absent).
    """

    path: str
    name: str
    sha256: str
    epoch: int | None
    global_step: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_checkpoint(path: str | Path) -> AnomalousPatchCore:
    """An AnomalousPatchCore from a Lightning checkpoint, on the CPU, in eval mode (see ``read_checkpoint``)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[AnomalousPatchCore, CheckpointIdentity]:
    """An AnomalousPatchCore from a Lightning checkpoint (on the CPU, in eval mode) and the checkpoint's identity.

    The encoder's initial weights (``pre_trained``, ``init_weights``) are not loaded again: the
    checkpoint holds the fine-tuned ones, and the hub or the original weight file may be out of reach.

    Raises:
        MissingInputError: No such file.
        InvalidInputError: Not a PyTorch checkpoint, a pickle of other Python objects (refused
            unread), or a checkpoint of another model; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: no such checkpoint file."
        raise MissingInputError(msg)
    data = path.read_bytes()
    checkpoint = _safe_unpickle(path, data)
    _check_is_apc_checkpoint(path, checkpoint)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            model = AnomalousPatchCore.load_from_checkpoint(
                io.BytesIO(data), map_location="cpu", pre_trained=False, init_weights=None,
            )
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        msg = f"{path}: not a loadable AnomalousPatchCore checkpoint ({type(error).__name__}: {first_line[:300]})."
        raise InvalidInputError(msg) from error
    identity = CheckpointIdentity(
        path=str(path),
        name=path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        epoch=_optional_int(checkpoint.get("epoch")),
        global_step=_optional_int(checkpoint.get("global_step")),
    )
    return model.eval(), identity


def _safe_unpickle(path: Path, data: bytes) -> dict[str, Any]:
    """The checkpoint's dictionary, unpickled with ``weights_only=True`` (tensors and plain data only)."""
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused_global = re.search(r"GLOBAL ([\w.]+)", str(error))
        stopped_at = re.search(r"Unsupported operand \d+", str(error))
        if refused_global:
            msg = (
                f"{path}: refused: the file holds Python objects other than tensors and plain data "
                f"({refused_global.group(1)}), which could run code when unpickled; export only checkpoints "
                "written by anomalib training."
            )
        else:
            detail = stopped_at.group(0) if stopped_at else str(error).strip().splitlines()[0][:200]
            msg = (
                f"{path}: not a PyTorch checkpoint that can be read safely (the weights-only unpickler stops: "
                f"{detail}); random bytes, or a pickle that torch.save did not write."
            )
        raise InvalidInputError(msg) from error
    # Arbitrary bytes make the unpickler fail in arbitrary ways (KeyError, EOFError, UnicodeDecodeError,
    # RuntimeError, ...); any of them means the same to the user.
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        msg = f"{path}: not a PyTorch checkpoint (cannot unpickle it: {type(error).__name__} {first_line})."
        raise InvalidInputError(msg) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        msg = f"{path}: not a Lightning checkpoint (no 'state_dict'); pass the model.ckpt that anomalib training wrote."
        raise InvalidInputError(msg)
    return checkpoint


def _check_is_apc_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    hyper_parameters = checkpoint.get("hyper_parameters")
    if not isinstance(hyper_parameters, dict) or not APC_ONLY_HYPER_PARAMETERS & set(hyper_parameters):
        msg = (
            f"{path}: not an AnomalousPatchCore checkpoint: its hyper-parameters lack the fine-tuning settings "
            "(finetune_epochs, tasks, ...), so it is of another model, e.g. anomalib's Patchcore."
        )
        raise InvalidInputError(msg)


def _optional_int(value: object) -> int | None:
    return int(value) if isinstance(value, int) else None
