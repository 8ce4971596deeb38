"""What fine-tuning changes: every encoder stage under "all", only batch-norm statistics under the control,
and the memory bank is made by the fine-tuned encoder."""

import pytest
import torch
from conftest import tiny_apc_model
from torch import nn

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore

MEMORY_BANK_STAGES = ("model.layer2.", "model.layer3.")


def datamodule(tiny_dataset) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                             train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0)


def fitted(train_tiny_apc, tiny_dataset, scope: str) -> AnomalousPatchCore:
    model = tiny_apc_model(finetune_scope=scope, coreset_sampling_ratio=1.0, learning_rate=1e-3)
    return train_tiny_apc(datamodule(tiny_dataset), model=model).model


@pytest.fixture(scope="module")
def initial() -> AnomalousPatchCore:
    """The same model before fitting: same seed, so the same initial weights."""
    return tiny_apc_model(coreset_sampling_ratio=1.0, learning_rate=1e-3)


@pytest.fixture(scope="module")
def full(train_tiny_apc, tiny_dataset) -> AnomalousPatchCore:
    return fitted(train_tiny_apc, tiny_dataset, "all")


@pytest.fixture(scope="module")
def statistics_only(train_tiny_apc, tiny_dataset) -> AnomalousPatchCore:
    return fitted(train_tiny_apc, tiny_dataset, "batchnorm_statistics")


def encoder_tensors(model: AnomalousPatchCore, kind: str) -> dict[str, torch.Tensor]:
    encoder = model.model.feature_extractor
    tensors = encoder.named_parameters() if kind == "parameters" else encoder.named_buffers()
    return {name: tensor.detach() for name, tensor in tensors}


def running_statistics(model: AnomalousPatchCore) -> dict[str, torch.Tensor]:
    return {name: value for name, value in encoder_tensors(model, "buffers").items()
            if name.endswith(("running_mean", "running_var"))}


def test_full_fine_tuning_changes_every_weight_of_the_memory_bank_stages(full, initial) -> None:
    before, after = encoder_tensors(initial, "parameters"), encoder_tensors(full, "parameters")
    stage_weights = [name for name in before if name.startswith(MEMORY_BANK_STAGES)]
    assert len(stage_weights) > 20
    unchanged = [name for name in stage_weights if torch.equal(before[name], after[name])]
    assert unchanged == []
    stem = "model.conv1.weight"
    assert not torch.equal(before[stem], after[stem])


def test_batchnorm_control_keeps_every_weight_and_adapts_the_running_statistics(statistics_only, initial) -> None:
    before, after = encoder_tensors(initial, "parameters"), encoder_tensors(statistics_only, "parameters")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    statistics_before, statistics_after = running_statistics(initial), running_statistics(statistics_only)
    bank_statistics = [name for name in statistics_before if name.startswith(MEMORY_BANK_STAGES)]
    assert bank_statistics
    assert all(not torch.equal(statistics_before[name], statistics_after[name]) for name in bank_statistics)
    assert statistics_only.configure_optimizers() is None


def test_batchnorm_control_runs_the_same_epochs_and_builds_the_bank_from_normal_images(statistics_only) -> None:
    assert statistics_only.trainer_arguments["max_epochs"] == 1
    assert statistics_only.model.memory_bank.shape[0] == 12 * 8 * 8  # tiny dataset: 12 normal training images


def bank_patches(model: AnomalousPatchCore, tiny_dataset) -> torch.Tensor:
    module = datamodule(tiny_dataset)
    module.setup()
    model.model.eval()
    transform = model.pre_processor.transform
    batches = module.normal_train_dataloader()
    return torch.cat([model.model.patch_embeddings(transform(batch.image)) for batch in batches])


@pytest.mark.parametrize("scope", ["full", "statistics_only"])
def test_memory_bank_is_made_by_the_adapted_encoder_not_the_initial_one(scope, request, initial, tiny_dataset) -> None:
    model = request.getfixturevalue(scope)
    bank = model.model.memory_bank
    adapted, original = bank_patches(model, tiny_dataset), bank_patches(initial, tiny_dataset)
    assert bank.shape == adapted.shape  # coreset_sampling_ratio=1.0 keeps every patch
    to_adapted = torch.cdist(bank, adapted, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
    to_original = torch.cdist(bank, original, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
    assert to_adapted.max() < 1e-4
    assert to_original.median() > 1000 * to_adapted.max() + 1e-2


def test_unknown_scope_is_named() -> None:
    with pytest.raises(InvalidInputError, match="finetune_scope must be one of"):
        AnomalousPatchCore(backbone="resnet18", pre_trained=False, finetune_scope="heads")


def test_batchnorm_control_has_nothing_to_optimise_but_keeps_batchnorm_in_train_mode() -> None:
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False, finetune_scope="batchnorm_statistics")
    assert model.fine_tunes and model.configure_optimizers() is None
    norms = [module for module in model.model.feature_extractor.modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms and all(module.training for module in norms)
