"""The verdict that opens ``results.md``: per category, which model detects and which localises better, and whether
the difference exceeds the spread over seeds. Reads the paired differences ``report`` computes.
"""

from collections.abc import Mapping, Sequence

from anomalib_apc.benchmark.settings import APC

VERDICT_LEVELS = (
    ("Detection", "detects", ("image_AUROC",)),
    ("Localisation", "localises", ("pixel_AUROC", "AUPRO")),
)
"""Each verdict line: its name, its verb, and the paired differences it reads (the first decides who is better)."""


def verdict_lines(differences: Sequence[dict], reference: str, headers: Mapping[str, str]) -> list[str]:
    """Per category, in three lines: who detects better, who localises better, by how much, against the seed spread.

    The difference is APC minus ``reference`` paired by seed; it *exceeds the seed spread* when its mean is
    larger in size than the standard deviation of the paired differences over seeds (one seed has no spread).
    ``headers`` names each quantity as the tables of ``results.md`` do.
    """
    rows = [row for row in differences if (row["model"], row["reference"]) == (APC, reference)]
    lines = ["## Verdict", ""] if rows else []
    for row in rows:
        seeds = row["seeds"]
        lines += [f"**{row['category']}** ({APC} minus {reference}, paired over {seeds} seed{'s' * (seeds > 1)}):", ""]
        judged = []
        for level, verb, keys in VERDICT_LEVELS:
            deciding = row[keys[0]]
            winner = "neither model" if deciding == 0 else (APC if deciding > 0 else reference)
            figures = " and ".join(f"{_signed_points(row, key)} {headers[key]}" for key in keys)
            lines.append(f"- {level}: {winner} {verb} better ({figures}).")
            judged.append(f"{headers[keys[0]]} {_against_spread(row, keys[0])}")
        if seeds < 2:
            lines.append("- One seed: no spread to judge these differences by (run --seeds 0 1 2).")
        else:
            lines.append(f"- Against the seed spread: {'; '.join(judged)}.")
        lines.append("")
    return lines


def _signed_points(row: dict, key: str) -> str:
    std = row[f"{key}_std"]
    return f"{100 * row[key]:+.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _against_spread(row: dict, key: str) -> str:
    std = row[f"{key}_std"] or 0.0
    return "exceeds it" if abs(row[key]) > std else "within it (not distinguishable)"
