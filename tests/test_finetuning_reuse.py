"""Benchmark rows derived from APC's fine-tuning equal the same variant trained from scratch."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_apc_model

from anomalib_apc.benchmark.finetuning_reuse import derive_from_apc
from anomalib_apc.benchmark.rows import Row, RowKind, plan_rows
from anomalib_apc.benchmark.settings import APC, PATCHCORE, BenchmarkSettings
from anomalib_apc.benchmark.variants import Variant, select_variants
from anomalib_apc.data import SupervisedMVTecAD

pytestmark = pytest.mark.integration


def _datamodule(tiny_dataset) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3, seed=0,
                             train_batch_size=4, eval_batch_size=8, num_workers=0)


def test_derived_variant_equals_the_variant_trained_from_scratch(tiny_dataset, train_tiny_apc) -> None:
    candidate = {"reestimate_batchnorm": True, "segmentation_fusion": 1.0}
    apc = train_tiny_apc(_datamodule(tiny_dataset)).model
    from_scratch = train_tiny_apc(_datamodule(tiny_dataset), **candidate).model.eval()

    torch.manual_seed(0)
    derived = tiny_apc_model(**candidate)
    assert _variant_row(candidate).reuses_apc_finetuning
    derive_from_apc(derived, apc, _datamodule(tiny_dataset))

    torch.testing.assert_close(derived.model.memory_bank, from_scratch.model.memory_bank, rtol=0, atol=0)
    datamodule = _datamodule(tiny_dataset)
    datamodule.setup()
    images = derived.pre_processor.transform(next(iter(datamodule.test_dataloader())).image)
    with torch.no_grad():
        expected, actual = from_scratch.model(images), derived.model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)


def _variant_row(model_arguments: dict[str, object], data_arguments: dict[str, object] | None = None) -> Row:
    variant = Variant("candidate", Path("candidate.yaml"), model_arguments, data_arguments or {})
    return Row("APC candidate", RowKind.VARIANT, variant=variant)


@pytest.mark.parametrize(
    ("model_arguments", "data_arguments", "reuses"),
    [
        ({"segmentation_fusion": 0.5}, {}, True),
        ({"reestimate_batchnorm": True, "coreset_sampler": "chunked", "patch_storage": "disk"}, {}, True),
        ({}, {}, True),
        ({"tasks": ["classification", "segmentation"]}, {}, False),
        ({"finetune_scope": "batchnorm_statistics"}, {}, False),
        ({"reestimate_batchnorm": True, "learning_rate": 1e-3}, {}, False),
        ({"reestimate_batchnorm": True}, {"cutpaste_probability": 0.0}, False),  # other batches, other weights
    ],
)
def test_only_variants_that_fine_tune_identically_reuse_apc(
    model_arguments: dict[str, object], data_arguments: dict[str, object], reuses: bool
) -> None:
    assert _variant_row(model_arguments, data_arguments).reuses_apc_finetuning is reuses


def test_only_variant_rows_reuse_and_the_others_fine_tune_on_every_device() -> None:
    rows = plan_rows(BenchmarkSettings(), select_variants(("no-cutpaste", "bn-reestimate")))
    assert [row.name for row in rows] == [PATCHCORE, APC, "APC no-cutpaste", "APC bn-reestimate"]
    assert [row.name for row in rows if row.reuses_apc_finetuning] == ["APC bn-reestimate"]
    assert [row.name for row in rows if row.fits_on_all_devices(2)] == [APC, "APC no-cutpaste"]
    assert not any(row.fits_on_all_devices(1) for row in rows)
