"""Smoke tests of the scripts in benchmarks/: each runs at tiny sizes and checks what it asserts itself."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts share measurements.py (and coreset_benchmark's timing)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measured(path: Path) -> object:
    """What a script wrote with ``--json``."""
    return json.loads(path.read_text())


def _run_script(name: str, *arguments: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_coreset_benchmark_finds_identical_indices_and_measures_speed_ups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script("coreset_benchmark", monkeypatch).main(
        ["--sizes", "3000", "--ratios", "0.02", "--dim", "64", "--features", "clustered", "--json", str(tmp_path / "m")]
    )  # raises AssertionError when the two samplers pick different indices
    [row] = _measured(tmp_path / "m")
    assert (row["rows"], row["ratio"], row["coreset_size"], row["steps"]) == (3000, 0.02, 60, 60)
    assert row["identical_indices"] is True and row["extrapolated"] is False
    assert all(seconds > 0 for seconds in row["selection_s"].values())


def test_phase2_profile_times_every_step_on_identical_coresets(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script("phase2_profile", monkeypatch).main(
        ["--root", str(tiny_dataset.root), "--category", tiny_dataset.category, "--image-size", "64",
         "--ratios", "0.1", "--backbone", "resnet18", "--json", str(tmp_path / "m")]
    )  # fmt: skip
    [profile] = _measured(tmp_path / "m")
    assert profile["normal_images"] == tiny_dataset.train_normal and profile["patches"] == [768, 384]
    assert profile["coreset_size"] == 76 and profile["identical_indices"] is True
    assert set(profile["seconds"]) == {"load", "extract", "aggregate", "collect", "sample", "total"}
    for step in profile["seconds"].values():
        assert step["anomalib"] >= 0 and step["ours"] >= 0
    total = profile["seconds"]["total"]["ours"]
    assert total == pytest.approx(sum(step["ours"] for name, step in profile["seconds"].items() if name != "total"))


def test_deploy_benchmark_runs_and_checks_parity(tiny_dataset, tmp_path: Path) -> None:
    _run_script(
        "deploy_benchmark", "--backbone", "resnet18", "--image-size", "64", "--memory-bank-size", "256", "--rounds",
        "1", "--batch-sizes", "1", "--skip-anomalib-openvino", "--segmentation-fusion", "1", "--category-dir",
        str(tiny_dataset.category_dir), "--work-dir", str(tmp_path), "--json", str(tmp_path / "m"),
    )
    measured = _measured(tmp_path / "m")
    assert set(measured["ms_per_image"]["1"]) == {"torch", "bundle", "bundle brute force", "bundle without fusion"}
    assert measured["speed_up_vs_torch"]["1"]["torch"] == 1.0
    assert measured["parity"]["labels_equal"] is True and measured["parity"]["images"] >= 4
    assert set(measured["bundle_batch_1_ms"]) == {"CNN (OpenVINO)", "search", "everything (predict)"}
    assert measured["accuracy"] is None


def test_deploy_benchmark_measures_int8_accuracy_on_every_test_image(tiny_dataset, tmp_path: Path) -> None:
    _run_script(
        "deploy_benchmark", "--backbone", "resnet18", "--image-size", "64", "--memory-bank-size", "256", "--rounds",
        "1", "--batch-sizes", "1", "--skip-anomalib-openvino", "--int8", "--compact-index", "ivf", "--accuracy",
        "--calibration-images", "8", "--category-dir", str(tiny_dataset.category_dir), "--work-dir", str(tmp_path),
        "--json", str(tmp_path / "m"),
    )
    accuracy = _measured(tmp_path / "m")["accuracy"]
    assert set(accuracy) == {"torch", "bundle", "bundle + ivf", "bundle int8", "bundle int8, float bank",
                             "bundle int8 + ivf"}
    # the FP32 bundle reproduces the PyTorch model, so their figures agree to rounding
    for metric in ("image_auroc", "pixel_auroc", "aupro", "labels_equal_to_fp32_bundle"):
        assert accuracy["torch"][metric] == pytest.approx(accuracy["bundle"][metric], abs=0.01)
    assert accuracy["bundle"]["labels_equal_to_fp32_bundle"] == 100.0
    assert accuracy["bundle int8"]["image_auroc"] == pytest.approx(accuracy["bundle"]["image_auroc"], abs=5)
    # the compact index against exact search on the same bank, every test patch of the bundle's own graph
    search = _measured(tmp_path / "m")["search_against_exact"]
    assert set(search) == {"bundle + ivf", "bundle int8 + ivf"}
    ivf = search["bundle int8 + ivf"]
    test_images = tiny_dataset.test_normal + tiny_dataset.per_defect_type * len(tiny_dataset.defect_types)
    assert ivf["images"] == test_images
    assert ivf["patches"] == test_images * (64 // 8) ** 2  # resnet18 layer2: stride 8
    assert ivf["max_relative_image_score_error"] <= 2 * ivf["max_relative_distance_error"] + 1e-5


def test_finetune_benchmark_compares_every_configuration_with_float32(tiny_dataset, tmp_path: Path) -> None:
    _run_script(
        "finetune_benchmark", "--backbone", "resnet18", "--image-size", "32", "--batch-size", "2", "--steps", "1",
        "--root", str(tiny_dataset.root), "--category", tiny_dataset.category, "--accuracy-seeds", "0",
        "--accuracy-image-size", "32", "--accuracy-epochs", "1", "--output", str(tmp_path), "--json",
        str(tmp_path / "m"),
    )
    measured = _measured(tmp_path / "m")
    losses = {name: result["final_loss"] for name, result in measured["throughput"].items()}
    assert set(losses) == {"fp32", "bf16", "channels-last", "bf16+channels-last"}
    for loss in losses.values():  # the same steps from the same weights: losses agree to bfloat16's precision
        assert loss == pytest.approx(losses["fp32"], rel=0.05)
    runs = measured["accuracy"]["runs"]
    assert set(runs) == {"fp32", measured["accuracy"]["default"]} and len(runs["fp32"]) == 1
    assert all(0 <= run["image_AUROC"] <= 1 and run["fit_seconds"] > 0 for seeds in runs.values() for run in seeds)


def test_approximate_search_benchmark_finds_indexrefine_equal_to_re_ranking_by_hand(tmp_path: Path) -> None:
    _run_script("approximate_search_benchmark", "--rows", "1024", "--dim", "32", "--rank", "4", "--queries", "64",
                "--runs", "1", "--json", str(tmp_path / "m"))
    measured = _measured(tmp_path / "m")
    assert set(measured) == {"hnsw", "ivf", "pca"}
    for index in measured.values():
        assert index["same_ids"] == 1.0 and index["bit_identical_distances"] is True
        assert index["max_abs_difference"] == 0.0


def test_predict_memory_benchmark_reports_both_reading_paths(tmp_path: Path) -> None:
    _run_script("predict_memory", "--images", "2", "--size", "700", "--image-size", "64", "--json", str(tmp_path / "m"))
    measured = _measured(tmp_path / "m")
    assert set(measured) == {"bounded", "full-size"}
    for mode in measured.values():
        assert mode["peak_rss_mb"] >= mode["rss_after_loading_mb"] > 0


def test_ddp_benchmark_runs_are_reproducible_and_compared(tiny_dataset, tmp_path: Path) -> None:
    arguments = ["--root", str(tiny_dataset.root), "--category", tiny_dataset.category, "--devices", "1",
                 "--epochs", "1", "--image-size", "32"]
    for run in ("a", "b"):
        result = json.loads(_run_script("ddp_benchmark", *arguments, "--out", str(tmp_path / run)).splitlines()[-1])
        assert result["finetune_off"]["memory_bank_rows"] > 0
        assert "image_AUROC" in result["finetune_on"]["metrics"]
    output = _run_script("ddp_benchmark", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert json.loads(output.splitlines()[-1])["memory_banks_identical"] is True


def test_chunked_coreset_benchmark_times_both_samplers_and_compares_coverage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script("chunked_coreset_benchmark", monkeypatch).main(
        ["--sizes", "4000", "8000", "--ratios", "0.05", "--dim", "32", "--full-exact-max-rows", "4000",
         "--exact-budget", "1", "--json", str(tmp_path / "m")]
    )  # fmt: skip
    full, extrapolated = _measured(tmp_path / "m")
    assert (full["rows"], full["ratio"], full["picks"], full["storage"]) == (4000, 0.05, 200, "memory")
    radius = full["coverage_radius"]
    assert radius["chunked"] <= 1.5 * radius["exact"] and radius["chunked"] < radius["random"]
    assert (extrapolated["rows"], extrapolated["picks"], extrapolated["exact_extrapolated"]) == (8000, 400, True)
    assert extrapolated["coverage_radius"] is None  # no coverage without the full exact bank


def test_coreset_accuracy_benchmark_pairs_exact_and_chunked_banks(
    tiny_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _script("coreset_accuracy_benchmark", monkeypatch).main(
        [str(tiny_dataset.category_dir), "--seeds", "0", "--backbone", "resnet18", "--image-size", "64",
         "--epochs", "1", "--json", str(tmp_path / "m")]
    )  # fmt: skip
    measured = _measured(tmp_path / "m")[tiny_dataset.category]
    [run] = measured["runs"]
    assert set(run) == {"Patchcore (exact)", "APC (exact)", "Patchcore (chunked)", "APC (chunked)"}
    for name in ("Patchcore", "APC"):
        for metric, [difference] in measured["chunked_minus_exact"][name].items():
            assert difference == pytest.approx(run[f"{name} (chunked)"][metric] - run[f"{name} (exact)"][metric])
    assert "radius" in run["APC (exact)"] and "radius" in run["APC (chunked)"]  # both APC banks of the first seed
    assert "radius" not in run["Patchcore (exact)"]
