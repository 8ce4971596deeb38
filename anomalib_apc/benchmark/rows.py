"""The rows of a benchmark's tables, decided once from the settings: the baselines, APC, APC's variants.

A :class:`Row` carries everything the later steps ask about one line of ``results.md``: its name (the
table's label and every run's ``model``), its kind, the anomalib class a baseline is built from, a
variant's constructor and datamodule overrides, and whether it reuses APC's fine-tuning. The runner,
the model builder and the report read rows; the settings stay as the user gave them.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from anomalib_apc.benchmark.baselines import baseline_row
from anomalib_apc.benchmark.settings import APC, PATCHCORE, PATCHCORE_FAST_CORESET, BenchmarkSettings
from anomalib_apc.benchmark.variants import Variant
from anomalib_apc.models.apc.checks import POST_FINETUNING_ARGUMENTS


class RowKind(Enum):
    """What a row is: it decides how its model is built, trained and compared."""

    BASELINE = "baseline"
    """An anomalib model trained one-class on the normal training images."""
    APC = "APC"
    """AnomalousPatchCore with the benchmark's settings."""
    VARIANT = "variant"
    """APC with an ablation config's overrides; compared with APC as well as with the first baseline."""


@dataclass(frozen=True)
class Row:
    """One model of the comparison, as every step after the settings sees it.

    Attributes:
        name: The table's label and every :class:`~.results.ModelRun`'s ``model`` (``Patchcore``, ``APC``,
            ``APC boxes``).
        kind: Baseline, APC or variant.
        baseline: The anomalib model class of a baseline row (``Patchcore``, ``Padim``, ...); ``None`` otherwise.
        fast_coreset: A Patchcore row whose coreset is selected by APC's ``FastKCenterGreedy``.
        variant: The ablation config of a variant row; ``None`` otherwise.
    """

    name: str
    kind: RowKind
    baseline: str | None = None
    fast_coreset: bool = False
    variant: Variant | None = None

    @property
    def model_arguments(self) -> dict[str, Any]:
        """Overrides of APC's constructor arguments (a variant's ``model.init_args``); empty for other rows."""
        return self.variant.model_arguments if self.variant else {}

    @property
    def data_arguments(self) -> dict[str, Any]:
        """Overrides of the supervised datamodule's arguments (a variant's ``data.init_args``); empty for other rows."""
        return self.variant.data_arguments if self.variant else {}

    @property
    def fine_tunes(self) -> bool:
        """Whether the row is an AnomalousPatchCore (APC or a variant), trained on the supervised batches."""
        return self.kind is not RowKind.BASELINE

    @property
    def reuses_apc_finetuning(self) -> bool:
        """Whether the row takes APC's fine-tuned state instead of fine-tuning itself (``finetuning_reuse``).

        A variant that overrides only arguments phase 1 never reads (``POST_FINETUNING_ARGUMENTS``) and no
        datamodule argument fine-tunes to exactly APC's weights, from the same batches, so it builds its own
        memory bank on APC's. A variant that spells out one of APC's own phase-1 values fine-tunes itself: the
        same result, at the cost of the time.
        """
        return (
            self.kind is RowKind.VARIANT
            and not self.data_arguments
            and set(self.model_arguments) <= POST_FINETUNING_ARGUMENTS
        )

    def fits_on_all_devices(self, devices: int) -> bool:
        """Whether the row fine-tunes with DDP on ``devices`` devices (APC and the variants that do not reuse it)."""
        return devices > 1 and self.fine_tunes and not self.reuses_apc_finetuning

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly summary for ``results.json``: name, kind and where the row's model comes from."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "baseline": self.baseline,
            "fast_coreset": self.fast_coreset,
            "variant_config": str(self.variant.path) if self.variant else None,
            "reuses_apc_finetuning": self.reuses_apc_finetuning,
        }


def variant_row(name: str) -> str:
    """The row name of APC variant ``name`` (``bn-only`` -> ``APC bn-only``)."""
    return f"{APC} {name}"


def plan_rows(settings: BenchmarkSettings, variants: Sequence[Variant] = ()) -> tuple[Row, ...]:
    """Every row of a benchmark, in table order: the baselines, the fast-coreset Patchcore if asked, APC, the variants.

    Baseline names are anomalib's class names (``mh_patchcore`` -> ``MHPatchcore``), repeats dropped.

    Raises:
        InvalidInputError: A baseline that is no anomalib model.
    """
    baselines = dict.fromkeys(baseline_row(name) for name in settings.baselines)
    rows = [Row(name, RowKind.BASELINE, baseline=name) for name in baselines]
    if settings.patchcore_fast_coreset:
        rows.append(Row(PATCHCORE_FAST_CORESET, RowKind.BASELINE, baseline=PATCHCORE, fast_coreset=True))
    rows.append(Row(APC, RowKind.APC))
    rows += [Row(variant_row(variant.name), RowKind.VARIANT, variant=variant) for variant in variants]
    return tuple(rows)
