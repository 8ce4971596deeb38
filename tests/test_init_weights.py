"""Encoder initialisation: torchvision, timm and MoCo v3 checkpoint files, key maps, refusals, offline hub."""

from pathlib import Path

import pytest
import timm
import torch
import torchvision

from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc import init_weights
from anomalib_apc.models.apc.encoder import TimmEncoder
from anomalib_apc.models.apc.init_weights import IncompatibleCheckpointError, PretrainedWeightsUnavailableError

LAYERS = ("layer2", "layer3")


def _seeded_torchvision_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def _assert_encoder_holds(encoder: TimmEncoder, reference: dict[str, torch.Tensor]) -> None:
    state = encoder.model.state_dict()
    compared = [key for key in reference if not key.startswith("fc.")]
    assert compared
    for key in compared:
        assert torch.equal(state[key], reference[key]), key


def test_torchvision_state_dict(tmp_path: Path) -> None:
    reference = _seeded_torchvision_resnet18()
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(reference, path)
    _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), reference)


def test_timm_state_dict_in_a_training_container(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = timm.create_model("resnet18").state_dict()
    path = tmp_path / "resnet18_timm.pth.tar"
    torch.save({"state_dict": reference, "epoch": 3}, path)
    _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), reference)


def test_moco_v3_checkpoint_keeps_the_base_encoder_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = _seeded_torchvision_resnet18()
    momentum = {key: torch.zeros_like(value) for key, value in reference.items()}
    projection = {"fc.0.weight": torch.randn(4096, 512), "fc.1.weight": torch.randn(4096)}
    state_dict = {f"module.base_encoder.{key}": value for key, value in reference.items() if not key.startswith("fc.")}
    state_dict |= {f"module.base_encoder.{key}": value for key, value in projection.items()}
    state_dict |= {f"module.momentum_encoder.{key}": value for key, value in momentum.items()}
    state_dict |= {"module.predictor.0.weight": torch.randn(4096, 256)}
    path = tmp_path / "r-50-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "resnet18", "state_dict": state_dict, "optimizer": {}}, path)
    with caplog.at_level("WARNING"):
        _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), reference)
    assert "unexpected" not in caplog.text and "missing" not in caplog.text


def test_user_key_map_renames_other_codebases(tmp_path: Path) -> None:
    reference = _seeded_torchvision_resnet18()
    path = tmp_path / "detector.pth"
    torch.save({f"backbone.body.{key}": value for key, value in reference.items()}, path)
    with pytest.raises(IncompatibleCheckpointError, match="none of its"):
        TimmEncoder("resnet18", LAYERS, init_weights=path)
    encoder = TimmEncoder("resnet18", LAYERS, init_weights=path, init_weights_key_map={r"^backbone\.body\.": ""})
    _assert_encoder_holds(encoder, reference)


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path) -> None:
    reference = _seeded_torchvision_resnet18()
    partial = {key: value for key, value in reference.items() if not key.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    model = timm.create_model("resnet18")
    report = init_weights.load_init_weights(model, path)
    assert report.unexpected == ["extra.weight"]
    assert report.missing and all(key.startswith("layer4.") for key in report.missing)
    assert "layer1.0.conv1.weight" in report.loaded


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(IncompatibleCheckpointError, match=r"does not fit 'resnet18'.*other shapes"):
        TimmEncoder("resnet18", LAYERS, init_weights=path)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "init_weights file not found"),
        (b"not a checkpoint", IncompatibleCheckpointError, "not a readable PyTorch checkpoint"),
        ({"epoch": 1}, IncompatibleCheckpointError, "holds no tensors"),
    ],
)
def test_unreadable_checkpoints_name_the_file(tmp_path: Path, content: object, error: type, message: str) -> None:
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=message) as raised:
        TimmEncoder("resnet18", LAYERS, init_weights=path)
    assert str(path) in str(raised.value)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub and an empty weights cache."""
    monkeypatch.setattr(init_weights, "_hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))


def test_unreachable_hub_gives_one_actionable_line(offline_hub) -> None:
    with pytest.raises(PretrainedWeightsUnavailableError) as raised:
        TimmEncoder("resnet18", LAYERS, pre_trained=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "init_weights" in message and "pre_trained" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_model_without_hub_weights_is_built_for_checkpoints_and_refuses_to_train(offline_hub, caplog) -> None:
    with caplog.at_level("WARNING"):
        model = AnomalousPatchCore(backbone="resnet18", pre_trained=True)
    assert "Cannot load pretrained weights for 'resnet18'" in caplog.text
    with pytest.raises(PretrainedWeightsUnavailableError, match="pre_trained=False"):
        model.on_fit_start()
    model.on_load_checkpoint({})
    model.on_fit_start()  # a checkpoint's weights replaced the missing ones
