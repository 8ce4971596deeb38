"""Benchmark rows derived from APC's fine-tuning equal the same variant trained from scratch."""

import pytest
import torch
from conftest import tiny_apc_model

from anomalib_apc.benchmark.finetuning_reuse import derive_from_apc, derived_rows, reuses_apc_finetuning
from anomalib_apc.benchmark.settings import APC, variant_row
from anomalib_apc.benchmark.variants import select_variants
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
    assert reuses_apc_finetuning(derived, apc)
    derive_from_apc(derived, apc, _datamodule(tiny_dataset))

    torch.testing.assert_close(derived.model.memory_bank, from_scratch.model.memory_bank, rtol=0, atol=0)
    datamodule = _datamodule(tiny_dataset)
    datamodule.setup()
    images = derived.pre_processor.transform(next(iter(datamodule.test_dataloader())).image)
    with torch.no_grad():
        expected, actual = from_scratch.model(images), derived.model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("apc_arguments", "variant_arguments", "reuses"),
    [
        ({}, {"segmentation_fusion": 0.5}, True),
        ({}, {"reestimate_batchnorm": True, "tasks": ["classification", "segmentation", "reconstruction"]}, True),
        ({}, {"tasks": ["classification", "segmentation"]}, False),
        ({}, {"finetune_scope": "batchnorm_statistics"}, False),
        ({}, {"reestimate_batchnorm": True, "learning_rate": 1e-3}, False),
        # APC's own state holds re-estimated statistics: the fine-tuned ones are gone
        ({"reestimate_batchnorm": True}, {"reestimate_batchnorm": False}, False),
    ],
)
def test_only_variants_that_fine_tune_identically_reuse_apc(
    apc_arguments: dict[str, object], variant_arguments: dict[str, object], reuses: bool
) -> None:
    apc = tiny_apc_model(**apc_arguments)
    assert reuses_apc_finetuning(tiny_apc_model(**variant_arguments), apc) is reuses


def test_a_variant_that_changes_the_training_data_fine_tunes_itself() -> None:
    """``no-cutpaste`` has APC's model arguments but other batches: reusing APC's weights would copy APC's row."""
    variants = select_variants(("no-cutpaste", "bn-reestimate"))
    assert variants[0].data_arguments and not variants[0].model_arguments
    models = {APC: tiny_apc_model()} | {
        variant_row(variant.name): tiny_apc_model(**variant.model_arguments) for variant in variants
    }
    assert derived_rows(models, variants) == {variant_row("bn-reestimate")}
