"""Smoke tests of the scripts in benchmarks/: each runs at tiny sizes and checks what it asserts itself."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coreset_benchmark_finds_identical_indices_and_prints_speed_ups(capsys: pytest.CaptureFixture) -> None:
    _script("coreset_benchmark").main(
        ["--sizes", "3000", "--ratios", "0.02", "--dim", "64", "--features", "clustered"]
    )  # raises AssertionError when the two samplers pick different indices
    rows = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("3000")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].split("|")]
    assert cells[0].split() == ["3000", "0.020", "60", "60"]  # n, ratio, coreset size, greedy steps (all measured)
    assert re.fullmatch(r"[\d.]+ +[\d.]+ +[\d.]+x", cells[2]) and cells[-1] == "True"


def test_phase2_profile_times_every_step_on_identical_coresets(tiny_dataset, capsys: pytest.CaptureFixture) -> None:
    _script("phase2_profile").main(
        ["--root", str(tiny_dataset.root), "--category", tiny_dataset.category, "--image-size", "64",
         "--ratios", "0.1", "--backbone", "resnet18"]
    )  # fmt: skip
    output = capsys.readouterr().out
    assert f"{tiny_dataset.category}: {tiny_dataset.train_normal} normal images, 768 x 384 patches" in output
    assert "(76 patches, identical indices)" in output
    steps = dict(re.findall(r"^\| (\w+) \| [\d.]+ s \| [\d.]+ s \| ([\d.]+)x \|$", output, flags=re.MULTILINE))
    assert set(steps) == {"load", "extract", "aggregate", "collect", "sample", "total"}


def test_deploy_benchmark_runs_and_checks_parity(tiny_dataset, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "deploy_benchmark.py"), "--backbone", "resnet18", "--image-size", "64",
         "--memory-bank-size", "256", "--rounds", "1", "--batch-sizes", "1", "--skip-anomalib-openvino",
         "--segmentation-fusion", "1", "--category-dir", str(tiny_dataset.category_dir), "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^bundle +[\d.]+ +[\d.]+x$", result.stdout, flags=re.MULTILINE), result.stdout
    assert re.search(r"^bundle, map unfused +[\d.]+ +[\d.]+x$", result.stdout, flags=re.MULTILINE), result.stdout
    assert "labels identical" in result.stdout


def test_finetune_benchmark_compares_every_configuration_with_float32(tiny_dataset, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "finetune_benchmark.py"), "--backbone", "resnet18", "--image-size", "32",
         "--batch-size", "2", "--steps", "1", "--root", str(tiny_dataset.root), "--category", tiny_dataset.category,
         "--accuracy-seeds", "0", "--accuracy-image-size", "32", "--accuracy-epochs", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table_row = r"^\| ([\w+-]+) \| [\d.]+ \| ([\d.]+)x \| [\d.]+ \| [\d.]+x \| \d+ MiB \| ([\d.]+) \|$"
    rows = {name: (float(ratio), float(loss))
            for name, ratio, loss in re.findall(table_row, result.stdout, flags=re.MULTILINE)}
    assert set(rows) == {"fp32", "bf16", "channels-last", "bf16+channels-last"}, result.stdout
    assert rows["fp32"][0] == 1.0
    for ratio, loss in rows.values():  # the same steps from the same weights: losses agree to bfloat16's precision
        assert ratio > 0 and loss == pytest.approx(rows["fp32"][1], rel=0.05)
    assert re.search(r"^\| fp32 \| [\d.]+ ± 0\.00", result.stdout, flags=re.MULTILINE), result.stdout
    assert re.search(r"^paired default \(.*\) - fp32, image_AUROC: [+-][\d.]+", result.stdout, flags=re.MULTILINE)


def _run_script(name: str, *arguments: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_approximate_search_benchmark_finds_indexrefine_equal_to_re_ranking_by_hand() -> None:
    output = _run_script("approximate_search_benchmark", "--rows", "1024", "--dim", "32", "--rank", "4",
                         "--queries", "64", "--runs", "1")
    for index_type in ("hnsw", "ivf"):
        line = next(line for line in output.splitlines() if line.startswith(index_type))
        assert "same ids 1.0000" in line and "bit-identical distances True" in line, output


def test_predict_memory_benchmark_reports_both_reading_paths() -> None:
    output = _run_script("predict_memory", "--images", "2", "--size", "700", "--image-size", "64")
    peaks = dict(re.findall(r"^ *([\w-]+): peak RSS (\d+) MB", output, flags=re.MULTILINE))
    assert set(peaks) == {"bounded", "full-size"}, output
    assert all(int(peak) > 0 for peak in peaks.values())


def test_ddp_benchmark_runs_are_reproducible_and_compared(tiny_dataset, tmp_path: Path) -> None:
    arguments = ["--root", str(tiny_dataset.root), "--category", tiny_dataset.category, "--devices", "1",
                 "--epochs", "1", "--image-size", "32"]
    for run in ("a", "b"):
        result = json.loads(_run_script("ddp_benchmark", *arguments, "--out", str(tmp_path / run)).splitlines()[-1])
        assert result["finetune_off"]["memory_bank_rows"] > 0
        assert "image_AUROC" in result["finetune_on"]["metrics"]
    output = _run_script("ddp_benchmark", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert json.loads(output.splitlines()[-1])["memory_banks_identical"] is True


def _markdown_rows(output: str) -> list[list[str]]:
    """The data rows of the Markdown tables in ``output``, as lists of stripped cells."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("| ") and not line.startswith("| rows") and not line.startswith("| row ")
    ]


def test_chunked_coreset_benchmark_times_both_samplers_and_compares_coverage(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it borrows coreset_benchmark's exact-greedy timing
    _script("chunked_coreset_benchmark").main(
        ["--sizes", "4000", "8000", "--ratios", "0.05", "--dim", "32", "--full-exact-max-rows", "4000",
         "--exact-budget", "1"]
    )  # fmt: skip
    full, extrapolated = _markdown_rows(capsys.readouterr().out)
    assert full[:4] == ["4,000", "0.05", "200", "memory"]
    exact_radius, chunked_radius, random_radius = (float(value) for value in full[9].split(" / "))
    assert chunked_radius <= 1.5 * exact_radius and chunked_radius < random_radius
    assert extrapolated[:3] == ["8,000", "0.05", "400"] and extrapolated[4].endswith("(extrapolated)")
    assert extrapolated[9] == "-"  # no coverage without the full exact bank


def test_coreset_accuracy_benchmark_pairs_exact_and_chunked_banks(tiny_dataset, capsys: pytest.CaptureFixture) -> None:
    _script("coreset_accuracy_benchmark").main(
        [str(tiny_dataset.category_dir), "--seeds", "0", "--backbone", "resnet18", "--image-size", "64",
         "--epochs", "1"]
    )  # fmt: skip
    output = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for cells in _markdown_rows(output)}
    assert set(rows) == {
        "Patchcore (exact)", "APC (exact)", "Patchcore (chunked)", "APC (chunked)",
        "Patchcore: chunked - exact (paired)", "APC: chunked - exact (paired)",
    }  # fmt: skip
    for name in ("Patchcore", "APC"):
        exact, chunked = (float(rows[f"{name} ({kind})"][0].split(" ± ")[0]) for kind in ("exact", "chunked"))
        assert float(rows[f"{name}: chunked - exact (paired)"][0].split(" ± ")[0]) == pytest.approx(
            chunked - exact, abs=0.011
        )
    assert output.count(", radius ") == 2  # both APC banks of the first seed
