"""configs/: generated from configs/generate.py, and every file parses with anomalib's own CLI parser."""

import importlib.util
import inspect
from pathlib import Path
from types import ModuleType

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()
CATEGORY_CONFIGS = sorted(CONFIGS.glob("*/mvtecad/*.yaml"))
ABLATIONS = sorted(CONFIGS.glob("ablations/*.yaml"))


@pytest.fixture(scope="module")
def parse(anomalib_parser):
    """Parse ``anomalib train`` arguments with one parser for all configs."""

    def parse_train(*arguments: str):
        return anomalib_parser.parse_args(["train", *arguments]).train

    return parse_train


def test_generated_files_are_up_to_date() -> None:
    expected = generate.render_all()
    on_disk = {path.relative_to(CONFIGS) for path in CONFIGS.glob("*/**/*.yaml")}
    assert on_disk == set(expected), "run `python configs/generate.py`"
    for relative, content in expected.items():
        assert (CONFIGS / relative).read_text() == content, f"{relative} is stale: run `python configs/generate.py`"


def test_every_category_has_an_apc_config_and_its_patchcore_baseline() -> None:
    for model in ("apc", "patchcore"):
        names = {path.stem for path in CONFIGS.glob(f"{model}/mvtecad/*.yaml")}
        assert names == set(generate.MVTEC_AD_CATEGORIES)


@pytest.mark.parametrize("path", CATEGORY_CONFIGS, ids=lambda path: f"{path.parent.parent.name}/{path.stem}")
def test_category_config_parses(parse, path: Path) -> None:
    config = parse("--config", str(path))
    assert config.model.class_path == "anomalib_apc.models.AnomalousPatchCore"
    assert config.data.class_path == "anomalib_apc.data.SupervisedMVTecAD"
    assert config.data.init_args.category == path.stem
    assert config.data.init_args.num_anomalies == 10
    tasks = config.model.init_args.tasks
    assert tasks == (
        [] if path.parent.parent.name == "patchcore" else ["classification", "segmentation", "reconstruction"]
    )


def _arguments_not_taken(override: dict) -> list[str]:
    """The override's argument names that this checkout's AnomalousPatchCore / SupervisedMVTecAD do not take yet."""
    from anomalib_apc.data import SupervisedMVTecAD
    from anomalib_apc.models import AnomalousPatchCore

    classes = {"model": AnomalousPatchCore, "data": SupervisedMVTecAD}
    return [
        f"{section}.{name}"
        for section, values in override.items()
        for name in values["init_args"]
        if name not in inspect.signature(classes[section].__init__).parameters
    ]


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda path: path.stem)
def test_ablation_overrides_a_category_config(parse, path: Path) -> None:
    not_taken = _arguments_not_taken(yaml.safe_load(path.read_text()))
    if not_taken:
        pytest.skip(f"{path.name} sets {not_taken}, which this checkout's classes do not take yet")
    config = parse("--config", str(CONFIGS / "apc" / "mvtecad" / "pill.yaml"), "--config", str(path))
    override = yaml.safe_load(path.read_text())
    for section, values in override.items():
        for name, value in values["init_args"].items():
            assert config[section].init_args[name] == value
    assert config.model.class_path == "anomalib_apc.models.AnomalousPatchCore"
    assert config.data.init_args.category == "pill" and config.model.init_args.backbone == "resnet50"


def test_short_class_names_work_in_configs(parse, tmp_path: Path) -> None:
    content = yaml.safe_load((CONFIGS / "apc" / "mvtecad" / "screw.yaml").read_text())
    content["model"]["class_path"] = "AnomalousPatchCore"
    content["data"]["class_path"] = "SupervisedMVTecAD"
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(content))
    config = parse("--config", str(path))
    assert config.model.class_path == "anomalib_apc.models.AnomalousPatchCore"
    assert config.data.class_path == "anomalib_apc.data.SupervisedMVTecAD"


def test_mpdd_cpu_config_parses_with_its_128_px_pre_processor(parse) -> None:
    config = parse("--config", str(CONFIGS / "apc" / "mpdd" / "metal_plate_cpu.yaml"))
    assert config.data.init_args.category == "metal_plate"
    assert config.model.init_args.pre_trained is False
    assert config.model.init_args.init_weights is None
    resize = config.model.init_args.pre_processor.init_args.transform.init_args.transforms[0]
    assert resize.class_path == "torchvision.transforms.v2.Resize"
    assert list(resize.init_args.size) == [128, 128]
