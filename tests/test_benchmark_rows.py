"""The benchmark's rows beyond Patchcore and APC: --variants (configs/ablations), --baselines, key map, image size."""

import inspect
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms.v2 import Resize

from anomalib_apc.benchmark import cli
from anomalib_apc.benchmark.baselines import baseline_row
from anomalib_apc.benchmark.data import CategoryData
from anomalib_apc.benchmark.metrics import make_evaluator, unit_interval
from anomalib_apc.benchmark.models import build_models, check_variant_arguments, resolve_initialisation
from anomalib_apc.benchmark.report import all_paired_differences, markdown_report, summarise
from anomalib_apc.benchmark.results import BenchmarkResult, Initialisation, ModelRun, SplitRun
from anomalib_apc.benchmark.rows import plan_rows
from anomalib_apc.benchmark.runner import make_datamodules, run_benchmark, split_off_unavailable_rows
from anomalib_apc.benchmark.settings import APC, PATCHCORE, BenchmarkSettings, parse_key_map
from anomalib_apc.benchmark.variants import ABLATIONS_DIR, Variant, load_variants, select_variants
from anomalib_apc.errors import InvalidInputError, PretrainedWeightsUnavailableError
from anomalib_apc.models import AnomalousPatchCore

RANDOM = Initialisation(False, None, "random")


def _settings(**overrides: object) -> BenchmarkSettings:
    values = {"backbone": "resnet18", "image_size": 64, "finetune_epochs": 1, "pre_trained": False} | overrides
    return BenchmarkSettings(**values).resolved()


def _models(
    settings: BenchmarkSettings,
    variants: list[Variant] | tuple[Variant, ...] = (),
    seed: int = 0,
    initialisation: Initialisation = RANDOM,
) -> dict[str, torch.nn.Module]:
    return build_models(plan_rows(settings, variants), settings, initialisation, seed)


def _encoder_state(model: AnomalousPatchCore) -> dict[str, torch.Tensor]:
    return model.model.feature_extractor.model.state_dict()


def _resize_size(model: torch.nn.Module) -> list[int]:
    return next(list(t.size) for t in model.pre_processor.transform.transforms if isinstance(t, Resize))


def test_every_ablation_file_is_a_variant_with_its_own_overrides() -> None:
    variants = load_variants()
    files = sorted(ABLATIONS_DIR.glob("*.yaml"))
    assert sorted(variants) == sorted(path.stem.replace("_", "-") for path in files)
    assert {"bn-only", "tasks-cls", "tasks-cls-seg", "tasks-none", "unet4", "no-cutpaste", "imagenet-init"} <= set(
        variants
    )
    for path in files:
        content = yaml.safe_load(path.read_text())
        variant = variants[path.stem.replace("_", "-")]
        assert variant.model_arguments == content.get("model", {}).get("init_args", {})
        assert variant.data_arguments == content.get("data", {}).get("init_args", {})
    assert variants["bn-only"].model_arguments == {"finetune_scope": "batchnorm_statistics"}


def test_variant_rows_apply_the_files_overrides_on_apcs_initial_weights() -> None:
    variants = select_variants(("tasks-cls", "unet4", "tasks-cls-seg"))
    models = _models(_settings(variants=("tasks-cls", "unet4", "tasks-cls-seg")), variants)
    assert list(models) == [PATCHCORE, APC, "APC tasks-cls", "APC unet4", "APC tasks-cls-seg"]
    assert models["APC tasks-cls"].model.tasks == ("classification",)
    assert models["APC tasks-cls-seg"].model.tasks == ("classification", "segmentation")
    assert models[APC].model.tasks == ("classification", "segmentation", "reconstruction")
    assert models["APC unet4"].hparams.decoder == "unet4" and models[APC].hparams.decoder == "unet2"
    for name in ("APC tasks-cls", "APC unet4"):
        for key, tensor in _encoder_state(models[APC]).items():
            torch.testing.assert_close(_encoder_state(models[name])[key], tensor)


def test_an_edited_ablation_file_changes_the_row(tmp_path: Path) -> None:
    folder = tmp_path / "ablations"
    shutil.copytree(ABLATIONS_DIR, folder)
    (folder / "tasks_cls.yaml").write_text("model:\n  init_args:\n    tasks: [segmentation]\n")
    variants = select_variants(("tasks-cls",), folder)
    models = _models(_settings(variants=("tasks-cls",)), variants)
    assert models["APC tasks-cls"].model.tasks == ("segmentation",)


def test_variant_datamodules_take_the_files_data_overrides(tiny_dataset) -> None:
    variants = select_variants(("no-cutpaste", "tasks-cls"))
    data = CategoryData(tiny_dataset.root, tiny_dataset.category)
    settings = _settings(variants=("no-cutpaste", "tasks-cls"))
    datamodules = make_datamodules(plan_rows(settings, variants), settings, data, 0)
    assert list(datamodules) == [PATCHCORE, APC, "APC no-cutpaste", "APC tasks-cls"]
    assert datamodules[PATCHCORE] not in (datamodules[APC], datamodules["APC tasks-cls"])
    assert datamodules["APC no-cutpaste"].cutpaste_probability == 0
    assert datamodules[APC].cutpaste_probability == datamodules["APC tasks-cls"].cutpaste_probability == 0.5
    for datamodule in datamodules.values():
        datamodule.setup()
    paths = {name: datamodule.supervised_anomaly_paths for name, datamodule in datamodules.items()}
    assert all(anomalies == paths[APC] for anomalies in paths.values())


def test_unknown_variant_lists_the_known_ones_before_any_work(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=r"unknown \['bn-onyl'\].*bn-only.*tasks-cls"):
        run_benchmark(BenchmarkSettings(variants=("bn-onyl",), output=output))
    assert not output.exists()


def test_variants_that_change_the_split_are_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"anomalies-5 \(sets \['num_anomalies'\]\).*--num-anomalies"):
        select_variants(("tasks-cls", "anomalies-5"))


def test_a_variant_argument_apc_does_not_take_is_refused() -> None:
    variant = Variant("typo", Path("typo.yaml"), {"taks": []}, {"cutpaste_probabilty": 0.0})
    with pytest.raises(InvalidInputError, match=r"model.init_args.taks.*data.init_args.cutpaste_probabilty"):
        check_variant_arguments([variant])


def test_bn_only_builds_when_the_model_takes_finetune_scope() -> None:
    if "finetune_scope" not in inspect.signature(AnomalousPatchCore.__init__).parameters:
        pytest.skip("AnomalousPatchCore has no finetune_scope argument in this checkout yet")
    variants = select_variants(("bn-only",))
    check_variant_arguments(variants)
    models = _models(_settings(variants=("bn-only",)), variants)
    assert models["APC bn-only"].hparams.finetune_scope == "batchnorm_statistics"


def test_pretrained_variant_is_skipped_with_a_notice_when_weights_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise PretrainedWeightsUnavailableError("offline")

    monkeypatch.setattr("anomalib_apc.benchmark.runner.create_encoder_backbone", offline)
    rows = plan_rows(_settings(), select_variants(("imagenet-init", "tasks-cls")))
    kept, notices = split_off_unavailable_rows(_settings(), RANDOM, rows)
    assert [row.name for row in kept] == [PATCHCORE, APC, "APC tasks-cls"]
    assert len(notices) == 1 and "APC imagenet-init skipped" in notices[0]
    assert split_off_unavailable_rows(_settings(), Initialisation(True, None, "hub"), rows) == (rows, [])


def test_baselines_share_backbone_weights_image_size_and_seed() -> None:
    settings = _settings(baselines=("Patchcore", "mh_patchcore"), image_size=(64, 48))
    models = _models(settings, seed=3)
    assert list(models) == [PATCHCORE, "MHPatchcore", APC]
    apc_state = _encoder_state(models[APC])
    for name in (PATCHCORE, "MHPatchcore"):
        extractor = models[name].model.feature_extractor
        assert extractor.backbone == "resnet18" and list(extractor.layers) == ["layer2", "layer3"]
        for key, tensor in extractor.feature_extractor.state_dict().items():
            torch.testing.assert_close(tensor, apc_state[key])
        assert models[name].coreset_seed == 3
        assert _resize_size(models[name]) == [64, 48]
    assert _resize_size(models[APC]) == [64, 48]


def test_unknown_baseline_is_refused_before_any_work(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with pytest.raises(InvalidInputError, match=r"'PatchKore'.*MHPatchcore.*Patchcore"):
        run_benchmark(BenchmarkSettings(baselines=("PatchKore",), output=output))
    assert not output.exists()
    assert baseline_row("mh_patchcore") == "MHPatchcore" and baseline_row("patchcore") == PATCHCORE


def test_vgg16_bn_trunk_reaches_both_models_with_the_same_features() -> None:
    settings = _settings(backbone="vgg16_bn", layers=("features.32", "features.42"), baselines=("Patchcore",))
    models = _models(settings)
    images = torch.rand(2, 3, 64, 64)
    apc_encoder, patchcore_extractor = models[APC].model.feature_extractor.eval(), models[PATCHCORE].model.eval()
    with torch.no_grad():
        expected = apc_encoder(images)
        actual = patchcore_extractor.feature_extractor(images)
    assert list(actual) == ["features.32", "features.42"]
    for layer in actual:
        torch.testing.assert_close(actual[layer], expected[layer])


def test_key_map_pairs_parse_in_order_and_bad_ones_are_named() -> None:
    assert parse_key_map((r"^module\.basenet\.slice\d\.=features.", "a=b=c")) == {
        r"^module\.basenet\.slice\d\.": "features.",
        "a": "b=c",
    }
    for bad, reason in (("no-separator", "expected REGEX=REPLACEMENT"), ("=x", "expected"), ("(=x", "not a regular")):
        with pytest.raises(InvalidInputError, match=reason):
            parse_key_map((bad,))
    with pytest.raises(InvalidInputError, match="give --init-weights PATH too"):
        BenchmarkSettings(init_weights_key_map=("a=b",)).resolved()


def test_key_map_renames_a_foreign_checkpoint_for_both_models(tmp_path: Path) -> None:
    reference = _models(_settings(), seed=7)[APC]
    checkpoint = tmp_path / "foreign.pth"
    torch.save({f"module.trunk.{key}": value for key, value in _encoder_state(reference).items()}, checkpoint)
    parser = cli.build_parser()
    arguments = ["--init-weights", str(checkpoint), "--init-weights-key-map", r"^module\.=", "--init-weights-key-map"]
    args = parser.parse_args([*arguments, r"^trunk\.=", "--backbone", "resnet18", "--image-size", "64"])
    settings = cli.settings_from_arguments(args).resolved()
    assert settings.key_map == {r"^module\.": "", r"^trunk\.": ""}
    initialisation = resolve_initialisation(settings)
    models = _models(settings, initialisation=initialisation)
    for key, tensor in _encoder_state(reference).items():
        torch.testing.assert_close(_encoder_state(models[APC])[key], tensor)
    for key, tensor in models[PATCHCORE].model.feature_extractor.feature_extractor.state_dict().items():
        torch.testing.assert_close(tensor, _encoder_state(reference)[key])


@pytest.mark.parametrize(
    ("values", "size", "shape"),
    [(["64"], 64, (64, 64)), (["64", "48"], (64, 48), (64, 48)), (["32", "32"], 32, (32, 32))],
)
def test_image_size_takes_one_or_two_values(values: list[str], size: object, shape: tuple[int, int]) -> None:
    settings = cli.settings_from_arguments(cli.build_parser().parse_args(["--image-size", *values])).resolved()
    assert (settings.image_size, settings.image_shape) == (size, shape)


def test_image_size_of_three_values_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="height and a width"):
        BenchmarkSettings(image_size=(64, 48, 32)).resolved()


def test_raw_scores_of_any_range_keep_their_ranking() -> None:
    scores = torch.tensor([180.0, 520.0, 17.5, 18.0, -3.0, 499.9])
    mapped = unit_interval(scores)
    assert torch.all((mapped > 0) & (mapped < 1))
    assert torch.equal(torch.argsort(mapped), torch.argsort(scores))
    assert len(set(mapped.tolist())) == len(scores)
    evaluator = make_evaluator()
    assert [metric.name for metric in evaluator.test_metrics] == [
        "image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "pixel_AUPRO",
    ]  # fmt: skip


def test_report_pairs_every_row_with_patchcore_and_each_variant_with_apc(tmp_path: Path) -> None:
    settings = _settings(variants=("tasks-cls",), baselines=("Patchcore", "MHPatchcore"), output=tmp_path)
    metrics = {"image_AUROC": 0.9, "image_F1Max": 0.8, "pixel_AUROC": 0.7, "pixel_F1Max": 0.6, "pixel_AUPRO": 0.5}
    aurocs = {PATCHCORE: 0.80, "MHPatchcore": 0.85, APC: 0.90, "APC tasks-cls": 0.87}
    runs = [ModelRun(m, "c", 0, {**metrics, "image_AUROC": a}, math.nan, 1.0, 1.0, 10, 8) for m, a in aurocs.items()]
    rows = plan_rows(settings, select_variants(settings.variants))
    result = BenchmarkResult(settings, rows, RANDOM, "cpu", [SplitRun("c", 0, runs)], notices=["Row X skipped"])
    differences = {(row["model"], row["reference"]): row["image_AUROC"] for row in all_paired_differences(result)}
    assert differences == pytest.approx({
        ("MHPatchcore", PATCHCORE): 0.05, (APC, PATCHCORE): 0.10, ("APC tasks-cls", PATCHCORE): 0.07,
        ("APC tasks-cls", APC): -0.03,
    })  # fmt: skip
    text = markdown_report(result, summarise(result), all_paired_differences(result))
    assert "## Minus Patchcore" in text and "## Minus APC" in text and "Row X skipped" in text
    assert "| APC tasks-cls | c | -3.00 |" in text
    assert "- APC variants (configs/ablations/, same split, seeds and initial weights): tasks-cls." in text
    assert text.startswith("# Patchcore vs MHPatchcore vs AnomalousPatchCore")


@pytest.mark.integration
def test_variants_and_baselines_run_on_the_same_split(tiny_dataset, tmp_path: Path) -> None:
    settings = BenchmarkSettings(
        dataset="mvtec-layout",
        root=tiny_dataset.category_dir,
        backbone="resnet18",
        image_size=(64, 64),
        finetune_epochs=1,
        pre_trained=False,
        train_batch_size=4,
        variants=("tasks-cls", "seg-fusion"),
        baselines=("Patchcore", "MHPatchcore"),
        output=tmp_path / "out",
    )
    result = run_benchmark(settings)
    assert result.failures == []
    runs = {run.model: run for run in result.runs}
    assert list(runs) == [PATCHCORE, "MHPatchcore", APC, "APC tasks-cls", "APC seg-fusion"]
    # seg-fusion is derived from APC's fine-tuning: the same image scores, other maps, APC's fine-tuning time
    fused, apc = runs["APC seg-fusion"], runs[APC]
    assert fused.metrics["image_AUROC"] == apc.metrics["image_AUROC"]
    assert fused.metrics["pixel_AUROC"] != apc.metrics["pixel_AUROC"]
    assert fused.finetune_s == apc.finetune_s
    assert any("APC seg-fusion reuse APC's fine-tuning" in notice for notice in result.notices)
    reference = runs[APC].test_image_paths
    assert len(reference) == tiny_dataset.test_normal + tiny_dataset.test_anomalous - 10
    assert all(run.test_image_paths == reference for run in runs.values())
    assert runs["MHPatchcore"].metrics["image_AUROC"] > 0.6  # raw scores in the hundreds: not tied by a sigmoid
    assert runs["APC tasks-cls"].finetune_s > 0 and math.isnan(runs["MHPatchcore"].finetune_s)
    assert {row.model for row in summarise(result)} == set(runs)
