"""Fine-tuning precision: bfloat16 where asked for, float32 for everything PatchCore computes."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_apc_model, tiny_engine

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models.apc.precision import native_bfloat16, resolve_finetune_precision


def _datamodule(tiny_dataset) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                             train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0)


def test_auto_precision_follows_the_device() -> None:
    cpu = torch.device("cpu")
    expected = "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32"
    assert resolve_finetune_precision("auto", cpu) == expected
    assert resolve_finetune_precision("32", cpu) == "32"
    assert resolve_finetune_precision("bf16-mixed", torch.device("meta")) == "bf16-mixed"
    assert resolve_finetune_precision("auto", torch.device("meta")) == "32"
    assert native_bfloat16(cpu) == (expected == "bf16-mixed")


def test_an_unknown_precision_is_refused_when_the_model_is_built() -> None:
    with pytest.raises(InvalidInputError, match="finetune_precision"):
        tiny_apc_model(finetune_precision="fp8")


def test_bf16_fine_tuning_runs_the_network_in_bfloat16_and_the_loss_in_float32() -> None:
    model = tiny_apc_model(finetune_precision="bf16-mixed", channels_last=True)
    model._finetune_precision_in_use = resolve_finetune_precision("bf16-mixed", torch.device("cpu"))
    dtypes: list[torch.dtype] = []
    convolutions = (module for module in model.model.feature_extractor.modules() if isinstance(module, torch.nn.Conv2d))
    first_conv = next(convolutions)
    first_conv.register_forward_hook(lambda _module, _inputs, output: dtypes.append(output.dtype))
    images = torch.randn(2, 3, 64, 64)
    losses = model.finetune_losses(images, torch.tensor([0, 1]), torch.zeros(2, 1, 64, 64))
    assert dtypes == [torch.bfloat16]
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values())
    losses["total"].backward()
    assert all(parameter.grad is None or parameter.grad.dtype == torch.float32 for parameter in model.parameters())


@pytest.mark.integration
def test_bf16_fine_tuning_keeps_the_memory_bank_float32_and_standard_layout(tiny_dataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_apc_model(finetune_precision="bf16-mixed", channels_last=True)
    initial = next(model.model.feature_extractor.parameters()).detach().clone()
    tiny_engine(tmp_path).fit(model=model, datamodule=_datamodule(tiny_dataset))
    assert model._finetune_precision_in_use == "bf16-mixed"
    assert model.model.memory_bank.dtype == torch.float32
    assert torch.isfinite(model.model.memory_bank).all()
    weights = next(model.model.feature_extractor.parameters())
    assert weights.is_contiguous() and not torch.equal(weights, initial)


@pytest.mark.integration
def test_scores_do_not_depend_on_the_trainers_precision(tiny_dataset, tmp_path: Path) -> None:
    """A mixed-precision trainer must not reach the nearest-neighbour scores: they stay float32."""
    from anomalib.engine import Engine

    torch.manual_seed(0)
    model = tiny_apc_model(finetune_precision="32", channels_last=False, post_processor=False, evaluator=False)
    datamodule = _datamodule(tiny_dataset)
    tiny_engine(tmp_path / "fit").fit(model=model, datamodule=datamodule)
    predictions = {}
    for precision in ("32", "bf16-mixed"):
        engine = Engine(default_root_dir=tmp_path / precision, logger=False, accelerator="cpu",
                        enable_progress_bar=False, precision=precision)
        batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
        predictions[precision] = (torch.cat([batch.pred_score for batch in batches]),
                                  torch.cat([batch.anomaly_map for batch in batches]))
    for reference, mixed in zip(predictions["32"], predictions["bf16-mixed"], strict=True):
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-6)
