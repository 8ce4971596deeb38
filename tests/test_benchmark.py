"""`anomalib-apc benchmark`: one split for both models, the tables and figures, failures kept apart."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_apc.benchmark import cli
from anomalib_apc.benchmark.data import CategoryData, resolve_categories
from anomalib_apc.benchmark.meter import warm_up
from anomalib_apc.benchmark.models import build_models, resolve_initialisation
from anomalib_apc.benchmark.report import (
    METRIC_HEADERS,
    all_paired_differences,
    markdown_report,
    paired_differences,
    summarise,
)
from anomalib_apc.benchmark.results import BenchmarkResult, Initialisation, ModelRun, SplitRun
from anomalib_apc.benchmark.rows import plan_rows
from anomalib_apc.benchmark.runner import describe_split_mismatch
from anomalib_apc.benchmark.settings import APC, CONFIG_FILE, PATCHCORE, PATCHCORE_FAST_CORESET, BenchmarkSettings
from anomalib_apc.benchmark.verdict import verdict_lines
from anomalib_apc.data import SPLIT_FILE_NAME, make_demo_dataset
from anomalib_apc.errors import PretrainedWeightsUnavailableError

TINY = ["--image-size", "64", "--backbone", "resnet18", "--seeds", "0", "--no-pretrained"]


def _run_cli(*arguments: str) -> int:
    return cli.run(cli.build_parser().parse_args(list(arguments)))


@pytest.fixture(scope="module")
def demo_benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny benchmark with the fast-coreset row on a broken category, then the demo; returns its output.

    The broken category (normal images, but no test anomalies to move to training) comes first, so
    the run also shows that a failure neither stops the benchmark nor leaks into the other
    category's results.
    """
    root = make_demo_dataset(tmp_path_factory.mktemp("data"), num_test_normal=10, num_per_defect_type=8).parent
    broken = root / "broken" / "train" / "good"
    broken.mkdir(parents=True)
    for image in sorted((root / "demo" / "train" / "good").iterdir())[:3]:
        shutil.copy(image, broken / image.name)
    output = tmp_path_factory.mktemp("benchmark")
    exit_code = _run_cli(
        *TINY,
        "--finetune-epochs",
        "1",
        "--patchcore-fast-coreset",
        "--dataset",
        "mvtecad",
        "--root",
        str(root),
        "--category",
        "broken",
        "--category",
        "demo",
        "--output",
        str(output),
    )
    assert exit_code == 1
    return output


@pytest.mark.integration
def test_writes_tables_with_every_quantity_and_a_mean_row(demo_benchmark: Path) -> None:
    with (demo_benchmark / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    quantities = [
        "image_AUROC",
        "image_F1",
        "pixel_AUROC",
        "pixel_F1",
        "AUPRO",
        "finetune_s",
        "memory_bank_s",
        "inference_ms_per_image",
        "memory_bank_rows",
    ]
    assert set(quantities) <= set(rows[0])
    assert [(row["model"], row["category"]) for row in rows] == [
        (PATCHCORE, "demo"),
        (PATCHCORE_FAST_CORESET, "demo"),
        (APC, "demo"),
        (PATCHCORE, "mean"),
        (PATCHCORE_FAST_CORESET, "mean"),
        (APC, "mean"),
    ]
    for row in rows:
        assert all(0.0 <= float(row[name]) <= 1.0 for name in quantities[:5])
        assert float(row["inference_ms_per_image"]) > 0 and int(float(row["memory_bank_rows"])) > 0
    report = json.loads((demo_benchmark / "results.json").read_text())
    assert {row["category"] for row in report["summary"]} == {"demo", "mean"}
    markdown = (demo_benchmark / "results.md").read_text()
    assert "| APC | demo |" in markdown and "## Minus Patchcore" in markdown
    assert "random (--no-pretrained)" in markdown


@pytest.mark.integration
def test_the_config_a_run_writes_repeats_it_exactly(demo_benchmark: Path, tmp_path: Path) -> None:
    """``--config OUTPUT/config.yaml`` (another output) gives every run's metrics again, to the last bit."""

    def metrics(output: Path) -> list[tuple]:
        runs = json.loads((output / "results.json").read_text())["runs"]
        return [(run["model"], run["category"], run["seed"], run["metrics"]) for run in runs if not run["error"]]

    repeat = tmp_path / "repeat"
    assert _run_cli("--config", str(demo_benchmark / CONFIG_FILE), "--output", str(repeat)) == 1  # broken again
    assert len(metrics(demo_benchmark)) == 3 and metrics(repeat) == metrics(demo_benchmark)
    original = (demo_benchmark / CONFIG_FILE).read_text()
    assert (repeat / CONFIG_FILE).read_text() == original.replace(str(demo_benchmark), str(repeat))


@pytest.mark.integration
def test_both_models_are_tested_on_the_split_without_the_training_anomalies(demo_benchmark: Path) -> None:
    runs = [run for run in json.loads((demo_benchmark / "results.json").read_text())["runs"] if not run["error"]]
    split_file = next((demo_benchmark / "runs").rglob(SPLIT_FILE_NAME))
    split = json.loads(split_file.read_text())
    assert len(split["train_anomalies"]) == 10
    test_paths = set(split["test_image_paths"])
    assert not test_paths & {anomaly["image_path"] for anomaly in split["train_anomalies"]}
    assert {run["num_test_images"] for run in runs} == {len(test_paths)}
    assert {run["num_test_anomalous"] for run in runs} == {24 - 10}


@pytest.mark.integration
def test_fast_coreset_row_reproduces_patchcore_and_apc_is_fine_tuned(demo_benchmark: Path) -> None:
    runs = {
        run["model"]: run
        for run in json.loads((demo_benchmark / "results.json").read_text())["runs"]
        if run["category"] == "demo"
    }
    assert runs[PATCHCORE_FAST_CORESET]["metrics"] == runs[PATCHCORE]["metrics"]
    assert runs[PATCHCORE]["finetune_s"] is None and runs[APC]["finetune_s"] > 0.0
    assert runs[APC]["memory_bank_rows"] == runs[PATCHCORE]["memory_bank_rows"]


@pytest.mark.integration
def test_results_md_shows_the_figures_inline(demo_benchmark: Path) -> None:
    markdown = (demo_benchmark / "results.md").read_text()
    for figure in ("demo_heatmaps", "demo_roc"):
        assert f"![{figure.replace('_', ' ')}](figures/{figure}.png)" in markdown
        assert (demo_benchmark / "figures" / f"{figure}.png").is_file()


@pytest.mark.integration
def test_writes_side_by_side_and_roc_figures(demo_benchmark: Path) -> None:
    assert sorted(path.name for path in (demo_benchmark / "figures").iterdir()) == ["demo_heatmaps.png", "demo_roc.png"]


@pytest.mark.integration
def test_failed_category_is_reported_and_the_others_kept(demo_benchmark: Path) -> None:
    report = json.loads((demo_benchmark / "results.json").read_text())
    failed = {(run["model"], run["category"]) for run in report["runs"] if run["error"]}
    assert failed == {(PATCHCORE, "broken"), (PATCHCORE_FAST_CORESET, "broken"), (APC, "broken")}
    assert len(report["failures"]) == 3
    assert "## Failed runs" in (demo_benchmark / "results.md").read_text()


def test_demo_dataset_is_written_under_the_output_when_no_root_is_given(tmp_path: Path) -> None:
    settings = BenchmarkSettings(output=tmp_path).resolved()
    assert resolve_categories(settings) == [CategoryData(tmp_path / "demo_dataset", "demo")]
    assert len(list((tmp_path / "demo_dataset" / "demo" / "train" / "good").iterdir())) > 0


def test_summary_gives_mean_and_spread_over_seeds_and_pairs_apc_with_patchcore(tmp_path: Path) -> None:
    settings = BenchmarkSettings(seeds=(0, 1), output=tmp_path).resolved()
    metrics = {"image_AUROC": 0.9, "image_F1Max": 0.8, "pixel_AUROC": 0.7, "pixel_F1Max": 0.6, "pixel_AUPRO": 0.5}

    def run(model: str, category: str, seed: int, image_auroc: float) -> ModelRun:
        finetune_s = 10.0 if model == APC else math.nan
        return ModelRun(model, category, seed, {**metrics, "image_AUROC": image_auroc}, finetune_s, 2.0, 5.0, 100, 8)

    splits = [
        SplitRun(category, seed, [run(PATCHCORE, category, seed, 0.8 + offset), run(APC, category, seed, 0.9 + offset)])
        for category, offset in (("a", 0.0), ("b", 0.04))
        for seed in (0, 1)
    ]
    splits[-1].runs[-1].metrics["image_AUROC"] = 0.96
    result = BenchmarkResult(settings, plan_rows(settings), Initialisation(False, None, "random"), "cpu", splits)
    rows = {(row.model, row.category): row for row in summarise(result)}
    assert rows[APC, "b"].mean["image_AUROC"] == pytest.approx(0.95)
    assert rows[APC, "b"].std["image_AUROC"] == pytest.approx(0.01 * math.sqrt(2))
    assert rows[APC, "mean"].mean["image_AUROC"] == pytest.approx((0.9 + 0.94 + 0.9 + 0.96) / 4)
    assert math.isnan(rows[PATCHCORE, "mean"].mean["finetune_s"]) and rows[APC, "mean"].std["finetune_s"] == 0.0
    differences = {row["category"]: row for row in paired_differences(result)}
    assert differences["a"]["image_AUROC"] == pytest.approx(0.1) and differences["a"]["seeds"] == 2
    assert set(differences) == {"a", "b", "mean"}


def test_models_start_from_identical_weights() -> None:
    settings = BenchmarkSettings(backbone="resnet18", image_size=64, finetune_epochs=1, pre_trained=False).resolved()
    models = build_models(plan_rows(settings), settings, resolve_initialisation(settings), seed=3)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        apc_features = models[APC].model.feature_extractor.eval()(images)
        patchcore_features = models[PATCHCORE].model.feature_extractor(images)
    for layer in settings.layers:
        torch.testing.assert_close(apc_features[layer], patchcore_features[layer])


def test_each_seed_draws_its_own_initial_weights() -> None:
    """Seeds are repeats of the experiment: each must start APC (and so Patchcore) from other weights."""
    settings = BenchmarkSettings(backbone="resnet18", image_size=64, finetune_epochs=1, pre_trained=False).resolved()
    initialisation = resolve_initialisation(settings)

    def first_conv(seed: int) -> torch.Tensor:
        apc = build_models(plan_rows(settings), settings, initialisation, seed=seed)[APC]
        return next(apc.model.feature_extractor.parameters())

    torch.testing.assert_close(first_conv(1), first_conv(1))
    assert not torch.equal(first_conv(1), first_conv(2))


def test_warm_up_leaves_the_encoder_as_it_was() -> None:
    settings = BenchmarkSettings(backbone="resnet18", image_size=32, eval_batch_size=2, pre_trained=False).resolved()
    apc = build_models(plan_rows(settings), settings, resolve_initialisation(settings), seed=0)[APC]
    state = {name: tensor.clone() for name, tensor in apc.state_dict().items()}
    modes = [module.training for module in apc.modules()]
    warm_up(apc, settings)
    assert [module.training for module in apc.modules()] == modes
    for name, tensor in apc.state_dict().items():
        torch.testing.assert_close(tensor, state[name])


def test_unavailable_pretrained_weights_give_one_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise PretrainedWeightsUnavailableError("offline")

    monkeypatch.setattr("anomalib_apc.benchmark.models.create_encoder_backbone", offline)
    initialisation = resolve_initialisation(BenchmarkSettings(backbone="resnet18").resolved())
    assert not initialisation.pre_trained and initialisation.init_weights is None
    assert "same random initialisation" in initialisation.notice


def test_missing_init_weights_stop_the_benchmark_before_any_run(tmp_path: Path) -> None:
    absent = tmp_path / "mocov3.pth.tar"
    with pytest.raises(FileNotFoundError, match=r"init_weights file not found: .*mocov3\.pth\.tar"):
        resolve_initialisation(BenchmarkSettings(init_weights=absent).resolved())


def test_differing_test_sets_are_refused() -> None:
    patchcore = ModelRun(PATCHCORE, "demo", 0, test_image_paths=["a.png", "b.png"])
    apc = ModelRun(APC, "demo", 0, test_image_paths=["a.png", "c.png"])
    assert "only in APC: ['c.png']" in describe_split_mismatch([patchcore, apc], object(), object())


def test_no_arguments_mean_the_demo_on_pretrained_features_over_three_seeds() -> None:
    settings = cli.settings_from_arguments(cli.build_parser().parse_args([])).resolved()
    assert (settings.dataset, settings.backbone, settings.layers, settings.init_weights) == (
        "demo",
        "vgg16_bn",
        ("features.22", "features.32"),
        "craft-vgg16-bn",
    )
    assert (settings.seeds, settings.image_size, settings.finetune_epochs) == ((0, 1, 2), 128, 5)
    with pytest.raises(ValueError, match="needs --root"):
        BenchmarkSettings(dataset="mvtecad").resolved()


def test_the_profile_weights_and_stages_follow_only_its_own_backbone() -> None:
    other = BenchmarkSettings(backbone="resnet18").resolved()
    assert (other.layers, other.init_weights, other.pre_trained) == (("layer2", "layer3"), None, True)
    random = BenchmarkSettings(pre_trained=False).resolved()  # --no-pretrained on the demo: no named weights
    assert (random.backbone, random.init_weights) == ("vgg16_bn", None)
    chosen = BenchmarkSettings(seeds=(4,), layers=("features.32",)).resolved()
    assert (chosen.seeds, chosen.layers) == ((4,), ("features.32",))
    real = BenchmarkSettings(dataset="mvtec-layout", root=Path("x")).resolved()
    assert (real.backbone, real.layers, real.init_weights, real.seeds) == ("resnet50", ("layer2", "layer3"), None, (0,))


@pytest.mark.integration
def test_module_entry_point_shows_the_benchmark_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_apc.benchmark", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--patchcore-fast-coreset" in result.stdout and "--num-anomalies" in result.stdout


def test_figure_panels_show_sixteen_bit_images_as_the_model_reads_them(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from anomalib_apc.benchmark.figures import input_panel

    gray = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    eight, sixteen = (input_panel(str(tmp_path / f"{name}.png"), (30, 20)) for name in ("eight", "sixteen"))
    assert sixteen.shape == (20, 30, 3)
    np.testing.assert_allclose(sixteen, eight, atol=1e-6)
    assert float(sixteen.mean()) < 0.9  # not the white image PIL's own RGB conversion makes of it


def _two_model_result(tmp_path: Path, apc_minus_patchcore: dict[int, tuple[float, float]]) -> BenchmarkResult:
    """Patchcore and APC on one category; per seed APC's image and pixel AUROC lie the given amounts above."""
    settings = BenchmarkSettings(seeds=tuple(apc_minus_patchcore), output=tmp_path).resolved()
    base = {"image_AUROC": 0.9, "image_F1Max": 0.8, "pixel_AUROC": 0.9, "pixel_F1Max": 0.6, "pixel_AUPRO": 0.7}
    splits = []
    for seed, (image, pixel) in apc_minus_patchcore.items():
        apc = base | {"image_AUROC": 0.9 + image, "pixel_AUROC": 0.9 + pixel, "pixel_AUPRO": 0.7 + pixel}
        runs = [ModelRun(PATCHCORE, "part", seed, dict(base)), ModelRun(APC, "part", seed, apc)]
        splits.append(SplitRun("part", seed, runs))
    return BenchmarkResult(settings, plan_rows(settings), Initialisation(False, None, "random"), "cpu", splits)


def test_verdict_names_the_better_model_per_level_and_judges_the_difference_against_the_seed_spread(
    tmp_path: Path,
) -> None:
    # image AUROC: +3, +5, +4 points (mean 4, spread 1: beyond it); pixel: -1, +2, -2.5 (mean -0.5, spread 2.3: within)
    result = _two_model_result(tmp_path, {0: (0.03, -0.01), 1: (0.05, 0.02), 2: (0.04, -0.025)})
    lines = verdict_lines(all_paired_differences(result), PATCHCORE, METRIC_HEADERS)
    assert lines[:4] == ["## Verdict", "", "**part** (APC minus Patchcore, paired over 3 seeds):", ""]
    assert lines[4] == "- Detection: APC detects better (+4.00 ± 1.00 Image AUROC)."
    assert lines[5] == "- Localisation: Patchcore localises better (-0.50 ± 2.29 Pixel AUROC and -0.50 ± 2.29 AUPRO)."
    assert lines[6] == (
        "- Against the seed spread: Image AUROC exceeds it; Pixel AUROC within it (not distinguishable)."
    )
    markdown = markdown_report(result, summarise(result), all_paired_differences(result))
    assert markdown.index("## Verdict") < markdown.index("| Model | Category |")


def test_verdict_of_one_seed_says_there_is_no_spread(tmp_path: Path) -> None:
    lines = verdict_lines(
        all_paired_differences(_two_model_result(tmp_path, {0: (-0.02, 0.01)})), PATCHCORE, METRIC_HEADERS
    )
    assert "- Detection: Patchcore detects better (-2.00 Image AUROC)." in lines
    assert "- One seed: no spread to judge these differences by (run --seeds 0 1 2)." in lines
