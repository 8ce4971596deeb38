"""The ``anomalib-apc`` console script: user errors are one line and exit status 2, anything else a traceback."""

from pathlib import Path

import pytest
import torch

from anomalib_apc.cli import main
from anomalib_apc.errors import (
    USER_ERROR_STATUS,
    InterruptedRunError,
    InvalidInputError,
    MissingInputError,
    OutputExistsError,
    run_reporting_user_errors,
)


def _run_command_raising(error: BaseException, verbose: bool = False) -> int:
    """What ``anomalib-apc fake`` exits with when its run raises ``error``."""

    def run() -> int:
        raise error

    return run_reporting_user_errors(run, "anomalib-apc fake", verbose)


@pytest.mark.parametrize(
    "error",
    [
        InvalidInputError("--batch-size must be at least 1, got 0."),
        MissingInputError("weights.pth: no such file."),
        OutputExistsError("bundle exists; pass --overwrite."),
        InterruptedRunError("stopped by SIGTERM."),
        FileNotFoundError("images/: no such folder."),
        FileExistsError("results/ exists."),
        PermissionError("results/: permission denied."),
        IsADirectoryError("scores.csv is a folder."),
        NotADirectoryError("bundle is a file."),
    ],
    ids=lambda error: type(error).__name__,
)
def test_user_error_is_one_line_and_status_2(error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_command_raising(error) == USER_ERROR_STATUS == 2
    captured = capsys.readouterr()
    assert captured.err == f"anomalib-apc fake: error: {error}\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug"), ValueError("a bug"), torch.OutOfMemoryError("CPU ran out of memory"), KeyError("field")],
    ids=lambda error: type(error).__name__,
)
def test_other_errors_propagate_with_their_traceback(error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(type(error)) as raised:
        _run_command_raising(error)
    assert raised.value is error
    assert capsys.readouterr().err == ""


def test_verbose_prints_the_traceback_of_a_user_error_before_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    error = InvalidInputError("--threads must be positive, got -1.")
    assert _run_command_raising(error, verbose=True) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "raise error" in "\n".join(lines)
    assert lines[-2] == "anomalib_apc.errors.InvalidInputError: --threads must be positive, got -1."
    assert lines[-1] == "anomalib-apc fake: error: --threads must be positive, got -1."


def test_status_of_the_command_is_the_exit_status() -> None:
    assert run_reporting_user_errors(lambda: 1, "anomalib-apc fake", verbose=False) == 1
    assert run_reporting_user_errors(lambda: None, "anomalib-apc fake", verbose=False) == 0


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_predict_with_a_missing_bundle_is_a_user_error(
    verbose: bool, tiny_dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_bundle"
    argv = ["predict", "--bundle", str(missing), "--output", str(tmp_path / "out"), str(tiny_dataset.category_dir)]
    assert main(["-v", *argv] if verbose else argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("anomalib-apc predict: error: ")
    assert str(missing) in lines[-1]
    assert ("Traceback (most recent call last):" in lines) is verbose
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("error", "is_user_error"),
    [
        (OutputExistsError("results exist"), True),
        (PermissionError("permission denied: out"), True),
        (ConnectionResetError("connection reset"), False),  # an OSError, but nothing the user's input caused
        (RuntimeError("a bug"), False),
    ],
)
def test_both_entry_points_share_one_error_policy(
    error: Exception, is_user_error: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from anomalib_apc.benchmark.cli import main as benchmark_main

    def fail(*arguments: object, **keywords: object) -> None:
        raise error

    monkeypatch.setattr("anomalib_apc.benchmark.runner.run_benchmark", fail)
    for entry_point, argv, program in (
        (main, ["benchmark", "--seeds", "0"], "anomalib-apc benchmark"),
        (benchmark_main, ["--seeds", "0"], "python -m anomalib_apc.benchmark"),
    ):
        if is_user_error:
            assert entry_point(argv) == 2
            assert capsys.readouterr().err.strip().splitlines() == [f"{program}: error: {error}"]
        else:
            with pytest.raises(type(error)):
                entry_point(argv)
