"""How a benchmark setting appears on the command line: the metadata each ``BenchmarkSettings`` field carries.

Kept apart from the settings so that they read as a list of options; ``cli`` builds the parser from both.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CliOption:
    """How one settings field appears on the command line.

    Attributes:
        help: Help text, without the default (the parser appends the field's default).
        group: Title of the option group.
        flag: The option string; ``None`` derives it from the field name (``num_workers`` -> ``--num-workers``).
        default_text: What the help shows as the default instead of the field's value.
        exclusive: Name of a mutually exclusive group the option belongs to.
        argparse: Further ``add_argument`` keywords (``type``, ``nargs``, ``action``, ``choices``, ``metavar``).
    """

    help: str
    group: str
    flag: str | None = None
    default_text: str | None = None
    exclusive: str | None = None
    argparse: dict[str, Any] = field(default_factory=dict)


DATA, MODELS, RUN = "data", "models (identical for every row)", "run"


def cli(help: str, group: str, **keywords: Any) -> dict[str, CliOption]:
    """A settings field's ``metadata``: its command-line option, with ``help`` and :class:`CliOption`'s ``keywords``.

    Keywords that are not :class:`CliOption` attributes go to ``argparse``'s ``add_argument``.
    """
    own = {"flag", "default_text", "exclusive"}
    option = CliOption(help, group, **{key: keywords.pop(key) for key in own & keywords.keys()}, argparse=keywords)
    return {"cli": option}
