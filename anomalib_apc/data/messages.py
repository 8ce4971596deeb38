"""How the data layer lists problems in one error message: one line per file, the first few only."""

from collections.abc import Sequence


def bulleted(lines: Sequence[str], limit: int = 20) -> str:
    """``lines`` as an indented bullet list, cut after ``limit`` lines with a count of the rest."""
    shown = [f"  - {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)
