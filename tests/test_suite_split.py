"""The unit/integration split of the suite: the marker is registered and training tests are marked."""

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
