"""`anomalib-apc benchmark`'s options, its output folder and its input checks (all before any training)."""

import argparse
import logging
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from anomalib_apc.benchmark import cli
from anomalib_apc.benchmark.runner import clear_earlier_results, run_benchmark
from anomalib_apc.benchmark.settings import MVTEC_LAYOUT, BenchmarkSettings
from anomalib_apc.cli import main as apc_main
from anomalib_apc.errors import InvalidInputError, MissingInputError, OutputExistsError

TINY = ["--image-size", "64", "--backbone", "resnet18", "--no-pretrained", "--finetune-epochs", "1"]


def _parse(*arguments: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(arguments))


def _main(capsys: pytest.CaptureFixture, *arguments: str) -> tuple[int, str]:
    """Run ``python -m anomalib_apc.benchmark ARGUMENTS`` in-process; exit code and stderr."""
    exit_code = cli.main(list(arguments))
    return exit_code, capsys.readouterr().err


def test_every_setting_is_an_option_with_the_settings_default() -> None:
    assert cli.settings_from_arguments(_parse()) == BenchmarkSettings()
    parser = cli.build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    names = {settings_field.name for settings_field in fields(BenchmarkSettings)}
    assert {action.dest for action in parser._actions} >= names
    assert {"--batch-size", "--category", "--no-pretrained", "--overwrite", "--dataset"} <= flags


def test_options_reach_their_settings_fields() -> None:
    settings = cli.settings_from_arguments(
        _parse("--batch-size", "4", "--category", "a", "--category", "b", "--seeds", "1", "2", "--no-pretrained")
    )
    assert (settings.train_batch_size, settings.categories, settings.seeds, settings.pre_trained) == (
        4,
        ("a", "b"),
        (1, 2),
        False,
    )
    with pytest.raises(SystemExit):
        _parse("--no-pretrained", "--init-weights", "x.pth")  # one initialisation or the other


def test_dataset_folder_is_the_deprecated_name_of_mvtec_layout(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = BenchmarkSettings(dataset="folder", root=tmp_path).resolved()
    assert settings.dataset == MVTEC_LAYOUT
    assert "--dataset folder is deprecated: use --dataset mvtec-layout" in caplog.text


def test_module_entry_point_does_not_import_the_top_level_cli() -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['benchmark', '--help']\n"
        "try:\n    runpy.run_module('anomalib_apc.benchmark', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('top-level cli imported:', 'anomalib_apc.cli' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "--overwrite" in result.stdout
    assert "top-level cli imported: False" in result.stdout, result.stderr[-2000:]


def test_used_output_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "results"
    output.mkdir()
    (output / "results.md").write_text("an earlier benchmark")
    with pytest.raises(OutputExistsError, match=f"--output {output} is not empty .*--overwrite"):
        run_benchmark(BenchmarkSettings(output=output))
    exit_code, stderr = _main(capsys, *TINY, "--output", str(output))
    assert exit_code == 2
    assert stderr.count("\n") == 1 and str(output) in stderr and "Traceback" not in stderr
    assert sorted(path.name for path in output.iterdir()) == ["results.md"]  # no demo dataset written either


def test_overwrite_deletes_the_earlier_results_only(tmp_path: Path) -> None:
    output = tmp_path / "results"
    for stale in ("runs/demo/seed9/APC/old.ckpt", "figures/old_roc.png", "results.csv", "notes.txt"):
        (output / stale).parent.mkdir(parents=True, exist_ok=True)
        (output / stale).write_text("old")
    clear_earlier_results(BenchmarkSettings(output=output, overwrite=True))
    assert sorted(path.name for path in output.iterdir()) == ["notes.txt"]


@pytest.mark.integration
def test_overwrite_leaves_no_stale_runs_beside_the_new(tmp_path: Path, tiny_dataset_copy) -> None:
    """The new run fails at set-up (a category without test anomalies) right after clearing: cheap, no training."""
    broken = tiny_dataset_copy.root / "broken" / "train" / "good"
    broken.mkdir(parents=True)
    for image in sorted((tiny_dataset_copy.category_dir / "train" / "good").iterdir())[:2]:
        (broken / image.name).write_bytes(image.read_bytes())
    output = tmp_path / "results"
    (output / "runs" / "old" / "seed0").mkdir(parents=True)
    (output / "results.md").write_text("STALE RESULT")
    assert cli.main([*TINY, "--dataset", "mvtecad", "--root", str(tiny_dataset_copy.root), "--category", "broken",
                     "--output", str(output), "--overwrite"]) == 1  # fmt: skip
    assert [path.name for path in (output / "runs").iterdir()] == ["broken"]
    assert "STALE RESULT" not in (output / "results.md").read_text()


def test_missing_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    absent = tmp_path / "no_such_dataset"
    exit_code, stderr = _main(capsys, "--dataset", MVTEC_LAYOUT, "--root", str(absent), "--output", str(tmp_path / "o"))
    assert exit_code == 2
    assert stderr == f"python -m anomalib_apc.benchmark: error: --root {absent}: no such folder.\n"
    assert apc_main(["benchmark", "--dataset", MVTEC_LAYOUT, "--root", str(absent), "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"anomalib-apc benchmark: error: --root {absent}: no such folder.\n"


def test_root_one_level_too_high_names_what_was_expected(tiny_dataset, tmp_path: Path) -> None:
    settings = BenchmarkSettings(dataset=MVTEC_LAYOUT, root=tiny_dataset.root, output=tmp_path)
    with pytest.raises(MissingInputError) as error:
        run_benchmark(settings)
    message = str(error.value)
    assert f"--root {tiny_dataset.root} is not a folder in MVTec AD layout: expected train/good" in message
    assert f"--root {tiny_dataset.category_dir}" in message  # the folder that would work
    assert not any(tmp_path.iterdir())


def test_missing_mvtec_category_is_named_and_not_downloaded(tiny_dataset, tmp_path: Path) -> None:
    settings = BenchmarkSettings(dataset="mvtecad", root=tiny_dataset.root, categories=("bottle",), output=tmp_path)
    expected = f"no folder for category bottle \\({tiny_dataset.root / 'bottle'} missing"
    with pytest.raises(MissingInputError, match=expected):
        run_benchmark(settings)
    assert not (tiny_dataset.root / "bottle").exists()


FLAGS = ["--dataset", MVTEC_LAYOUT, "--root", "parts", "--seeds", "3", "4", "--image-size", "96", "64", "--batch-size",
         "4", "--init-weights", "trunk.pth", "--init-weights-key-map", "^a=b", "--variants", "bn-only", "--overwrite"]


def test_print_config_is_a_config_file_that_gives_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        _parse(*FLAGS, "--print_config")
    config = tmp_path / "settings.yaml"
    config.write_text(capsys.readouterr().out)
    from_flags = cli.settings_from_arguments(_parse(*FLAGS))
    assert from_flags.image_size == (96, 64) and from_flags.init_weights == "trunk.pth"
    assert cli.settings_from_arguments(_parse("--config", str(config))) == from_flags
    overridden = cli.settings_from_arguments(_parse("--config", str(config), "--seeds", "7"))
    assert (overridden.seeds, overridden.train_batch_size) == ((7,), 4)  # options after --config win, others kept


def test_the_config_a_run_writes_resolves_to_the_same_settings(tmp_path: Path) -> None:
    """``OUTPUT/config.yaml`` pins what the profile filled in, so a later default cannot change a repeat."""
    for settings in (
        BenchmarkSettings(),  # the demo: profile backbone, layers, named weights and seeds
        cli.settings_from_arguments(_parse(*FLAGS)),
        BenchmarkSettings(dataset="folder", root=tmp_path, pre_trained=False, image_size=(64, 64)),
    ):
        resolved = settings.resolved()
        config = tmp_path / "config.yaml"
        config.write_text(resolved.as_config())
        repeated = cli.settings_from_arguments(_parse("--config", str(config)))
        assert repeated.resolved() == replace(resolved, overwrite=False)


def test_contradicting_initialisations_in_a_config_are_named(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("pre_trained: false\ninit_weights: trunk.pth\n")
    settings = cli.settings_from_arguments(_parse("--config", str(config)))
    with pytest.raises(InvalidInputError, match=r"--no-pretrained .*and --init-weights trunk.pth contradict"):
        settings.resolved()


@pytest.mark.parametrize(
    ("content", "named"),
    [("num_anomalie: 3\n", "num_anomalie"), ("annotation: boxes\n", '"annotation"'), ("seeds: [a]\n", '"seeds"'),
     ("image_size: 256\n", "not iterable")],  # jsonargparse names no key when a list option gets one value
)
def test_a_bad_config_key_or_value_fails_the_parse(
    tmp_path: Path, content: str, named: str, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        _parse("--config", str(config))
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
