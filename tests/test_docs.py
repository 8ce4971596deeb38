"""Every shell command in README.md, docs/ and configs/README.md is checked, so the documentation cannot rot.

Each fenced ``bash`` block is preceded by a marker saying how:

- ``<!-- docs-check: run -->``: its commands are run here, in a scratch folder (cheap ones only);
- ``<!-- docs-check: parse -->``: each command is parsed by the parser of the program it calls
  (``anomalib-apc``'s, with the benchmark settings resolved; anomalib's own CLI, which checks class
  paths, argument names and types), so a renamed flag or a wrong value fails here, without training;
- ``<!-- docs-check: covered by PATH -->``: PATH (a test or script of this repository) runs it.

A block without a marker fails the check.
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTS = (REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md")), REPOSITORY / "configs/README.md")
BLOCK = re.compile(r"(?:<!-- docs-check: (?P<check>[^>]*?) -->\n)?```bash\n(?P<body>.*?)```", re.DOTALL)
ENVIRONMENT_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
SHARED = REPOSITORY.parent / "shared"


@dataclass(frozen=True)
class Block:
    """One fenced bash block: where it is, how it is checked, its commands (continuations joined, comments dropped)."""

    document: Path
    line: int
    check: str | None
    commands: tuple[tuple[str, ...], ...]

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(REPOSITORY)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            body = match.group("body").replace("\\\n", " ")
            commands = tuple(
                tuple(_without_environment(shlex.split(line, comments=True)))
                for line in body.splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            )
            found.append(Block(document, text.count("\n", 0, match.start("body")), match.group("check"), commands))
    return found


def _without_environment(words: list[str]) -> list[str]:
    """The command without the ``NAME=value`` assignments before it."""
    while words and ENVIRONMENT_ASSIGNMENT.match(words[0]):
        words = words[1:]
    return words


ALL_BLOCKS = blocks()


def test_every_bash_block_says_how_it_is_checked() -> None:
    unmarked = [block.where for block in ALL_BLOCKS if block.check is None]
    assert ALL_BLOCKS
    assert not unmarked, f"bash blocks without a <!-- docs-check: ... --> marker: {unmarked}"
    unknown = [block.where for block in ALL_BLOCKS if not re.fullmatch(r"run|parse|covered by \S+", block.check)]
    assert not unknown, f"unknown docs-check markers: {unknown}"


def test_what_covers_a_block_exists() -> None:
    for block in ALL_BLOCKS:
        if block.check.startswith("covered by "):
            target = block.check.removeprefix("covered by ")
            assert (REPOSITORY / target).exists(), f"{block.where}: {target} does not exist"


def _commands(check: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(block.where, command) for block in ALL_BLOCKS if block.check == check for command in block.commands]


@pytest.mark.parametrize(("where", "command"), _commands("parse"), ids=lambda value: str(value)[:60])
def test_documented_command_parses(where: str, command: tuple[str, ...], anomalib_parser, monkeypatch) -> None:
    monkeypatch.chdir(REPOSITORY)  # configs/... paths in the docs are relative to the repository
    program, *arguments = command
    if program == "anomalib-apc":
        from anomalib_apc.benchmark.cli import settings_from_arguments
        from anomalib_apc.cli import build_parser

        parsed = build_parser().parse_args(arguments)
        if parsed.command == "benchmark":
            settings_from_arguments(parsed.benchmark).resolved()
    elif program == "anomalib":
        parsed = anomalib_parser.parse_args(arguments)
        assert parsed.subcommand == arguments[0], where
    else:
        pytest.fail(f"{where}: no parser known for {program!r}; mark the block 'run' or 'covered by PATH'")


@pytest.mark.integration
@pytest.mark.parametrize(("where", "command"), _commands("run"), ids=lambda value: str(value)[:60])
def test_documented_command_runs(where: str, command: tuple[str, ...], tmp_path: Path) -> None:
    if any("../shared" in word for word in command) and not SHARED.is_dir():
        pytest.skip(f"{where} reads ../shared, which is absent")
    words = [word.replace("../shared", str(SHARED)) for word in command]
    if words[0] == "python":
        words[0] = sys.executable
    environment = os.environ | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(words, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{where}: {shlex.join(command)}\n{result.stderr[-3000:]}"
