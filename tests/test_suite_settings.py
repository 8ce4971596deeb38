"""The suite's own settings: the unit/integration split, and which deprecation warnings it silences.

The warning tests rely on the ``filterwarnings`` of pyproject.toml, which pytest applies to every test.
"""

import warnings
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

EXAMPLE = """
import pytest


@pytest.fixture
def trained(train_tiny_apc):
    return train_tiny_apc


def test_unit():
    pass


def test_trains(train_tiny_apc):
    pass


def test_trains_through_a_fixture(trained):
    pass


@pytest.mark.integration
def test_runs_a_subprocess():
    pass
"""


@pytest.fixture
def example(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with this suite's conftest and pytest settings, and one test file of each kind."""
    pytester.makepyprojecttoml((TESTS.parent / "pyproject.toml").read_text())
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_example=EXAMPLE)
    return pytester


def test_fast_half_deselects_tests_that_train_or_are_marked(example: pytest.Pytester) -> None:
    result = example.runpytest("-m", "not integration", "test_example.py")
    result.assert_outcomes(passed=1, deselected=3)
    result.stdout.fnmatch_lines(["*test_example.py .*"])


def test_integration_half_is_the_rest(example: pytest.Pytester) -> None:
    result = example.runpytest("-m", "integration", "-v", "test_example.py")
    result.assert_outcomes(passed=3, deselected=1)
    result.stdout.no_fnmatch_line("*test_unit*")


def _warnings_shown(message: str, category: type[Warning], module: str) -> list[warnings.WarningMessage]:
    """The warnings that the active filters let through when ``module`` warns (errors raise)."""
    with warnings.catch_warnings(record=True) as shown:  # keeps the filters, unlike pytest.warns
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return shown


def test_named_third_party_deprecations_are_silenced() -> None:
    assert _warnings_shown("`torch.jit.trace` is deprecated. Please switch to `torch.compile` or `torch.export`.",
                           FutureWarning, "torch.jit._trace") == []
    assert _warnings_shown("Argument embeddings is deprecated since v2.1.0.", DeprecationWarning,
                           "anomalib.models.image.patchcore.lightning_model") == []


def test_other_deprecations_stay_visible() -> None:
    shown = _warnings_shown("_create_val_split is deprecated", DeprecationWarning, "anomalib.data.datamodules.base")
    assert [str(warning.message) for warning in shown] == ["_create_val_split is deprecated"]
    # The same silenced message is shown when another module warns with it.
    assert len(_warnings_shown("`torch.jit.trace` is deprecated.", FutureWarning, "torch.onnx.utils")) == 1


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["anomalib_apc", "anomalib_apc.models.apc.lightning_model"])
def test_deprecations_attributed_to_anomalib_apc_fail(category: type[Warning], module: str) -> None:
    with pytest.raises(category, match="old API"):
        _warnings_shown("old API", category, module)
