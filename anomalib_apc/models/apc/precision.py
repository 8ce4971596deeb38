"""Numeric precision of APC's two phases.

Fine-tuning (phase 1) is most of APC's cost, and on CPUs with AVX-512 BF16 / AMX and on recent GPUs
bfloat16 convolutions are several times faster than float32 ones. bfloat16 keeps float32's exponent
range, so it needs no loss scaling. Everything that decides the result of PatchCore's second phase
stays float32: the memory bank's patch features, the coreset selection and the nearest-neighbour
scores are computed with autocast switched off, so a run's memory bank and test scores depend on
the training precision only through the weights it learnt.

``finetune_precision="auto"`` picks ``"bf16-mixed"`` where the device computes bfloat16 natively
(measured in ``benchmarks/finetune_benchmark.py``) and ``"32"`` elsewhere. Lightning's own
``--trainer.precision bf16-mixed`` / ``16-mixed`` work as well: they wrap every step in autocast, and
the float32 sections here switch it off again for the memory bank and the scores.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from anomalib_apc.errors import check_choice

FineTunePrecision = Literal["auto", "32", "bf16-mixed"]
FINETUNE_PRECISIONS: tuple[str, ...] = ("auto", "32", "bf16-mixed")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (AVX-512 BF16 / AMX on CPU, Ampere+ on CUDA)."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def resolve_finetune_precision(precision: str, device: torch.device) -> str:
    """The precision fine-tuning runs in: ``precision`` itself, or for ``"auto"`` the device's fastest safe one."""
    check_choice("finetune_precision", precision, FINETUNE_PRECISIONS)
    if precision == "auto":
        return "bf16-mixed" if native_bfloat16(device) else "32"
    return precision


def finetune_autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """Autocast for one fine-tuning step at the resolved ``precision``.

    ``"32"`` adds nothing, so a mixed ``--trainer.precision`` (Lightning's autocast around the step,
    with its gradient scaler for ``16-mixed``) still applies.
    """
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def full_precision(device: torch.device) -> AbstractContextManager:
    """Switch autocast off (also Lightning's), for the memory bank, the coreset and the scores."""
    return torch.autocast(device.type, enabled=False)
