"""Variant rows that reuse APC's fine-tuning, because they differ from APC only in what phase 1 never reads.

Fine-tuning is deterministic for a given seed (the same initial weights, batches and CutPaste
draws), so a variant that only changes how the memory bank's statistics are taken or how the map
is made (``POST_FINETUNING_ARGUMENTS``) and leaves the datamodule as APC's would fine-tune to
exactly APC's weights. Such a row (``Row.reuses_apc_finetuning``) takes APC's fine-tuned state and
builds its own memory bank under its own arguments: it costs a phase 2 and a test instead of a whole
fine-tuning, with the same result (``tests/test_finetuning_reuse.py`` compares it with the variant
trained from scratch). A variant with datamodule overrides (``no-cutpaste``) trains on other batches,
so it always fine-tunes itself.
"""

import time
from collections.abc import Sequence

from anomalib.engine import Engine

from anomalib_apc.benchmark.results import ModelRun
from anomalib_apc.benchmark.settings import APC
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.normal_images import normal_training_dataloader


def derive_from_apc(variant: AnomalousPatchCore, apc: AnomalousPatchCore, datamodule: SupervisedMVTecAD) -> None:
    """Give ``variant`` APC's fine-tuned weights, then its own memory bank (phase 2 under its arguments)."""
    variant.to(apc.device)
    variant.load_state_dict(apc.state_dict())
    variant.eval()
    datamodule.setup()
    variant.build_memory_bank(normal_training_dataloader(datamodule))


def derive_and_test(
    variant: AnomalousPatchCore,
    apc: AnomalousPatchCore,
    earlier_runs: Sequence[ModelRun],
    engine: Engine,
    datamodule: SupervisedMVTecAD,
) -> tuple[dict[str, float], float, float]:
    """Test a derived row: its test metrics, its fine-tuning time (APC's) and the seconds its phase 2 took.

    Raises:
        InvalidInputError: APC's own run failed (or has not run), so there is nothing to reuse.
    """
    apc_run = next((run for run in earlier_runs if run.model == APC and run.ok), None)
    if apc_run is None:
        msg = f"{APC} failed, so there is no fine-tuning to reuse"
        raise InvalidInputError(msg)
    started = time.perf_counter()
    derive_from_apc(variant, apc, datamodule)
    memory_bank_s = time.perf_counter() - started
    return engine.test(variant, datamodule=datamodule, verbose=False)[0], apc_run.finetune_s, memory_bank_s
