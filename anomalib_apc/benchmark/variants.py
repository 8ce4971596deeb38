"""APC variants of a benchmark, read from the ablation configs so that the files and the rows cannot disagree.

A variant is one file of ``configs/ablations/``: its name is the file stem with ``_`` as ``-``
(``tasks_cls.yaml`` -> ``tasks-cls``), its ``model.init_args`` are overrides of
``AnomalousPatchCore``'s constructor and its ``data.init_args`` overrides of the supervised
datamodule's. The benchmark builds each variant like APC (same split, seed, initial weights and
coreset seed) with those overrides applied, and nothing else changed.

Variants whose data overrides change the split (``anomalies_N``: ``num_anomalies``) cannot be
compared on the same test images and are refused; run them as their own benchmark with
``--num-anomalies N`` instead.

Imports nothing heavy: the overrides are checked against the constructors' signatures by the caller.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from anomalib_apc.errors import InvalidInputError, MissingInputError

ABLATIONS_DIR = Path(__file__).resolve().parents[2] / "configs" / "ablations"
"""The ablation configs of the source tree (``configs/ablations/*.yaml``, written by ``configs/generate.py``)."""

SPLIT_ARGUMENTS = frozenset({"root", "category", "num_anomalies", "seed"})
"""Datamodule arguments that decide the split: a variant may not change them (it would test on other images)."""


@dataclass(frozen=True)
class Variant:
    """One APC configuration of ``configs/ablations/``.

    Attributes:
        name: ``--variants`` name (file stem, ``_`` as ``-``).
        path: The YAML file it was read from.
        model_arguments: Overrides of ``AnomalousPatchCore``'s constructor (``model.init_args``).
        data_arguments: Overrides of the supervised datamodule's constructor (``data.init_args``).
    """

    name: str
    path: Path
    model_arguments: dict[str, Any]
    data_arguments: dict[str, Any]

    @property
    def changes_split(self) -> bool:
        """Whether the variant would move other anomalies to training (so test on other images)."""
        return bool(SPLIT_ARGUMENTS & self.data_arguments.keys())

    @property
    def needs_pretrained_weights(self) -> bool:
        """Whether the variant starts from timm's hub weights (``imagenet-init``), which may be unavailable."""
        return bool(self.model_arguments.get("pre_trained")) and self.model_arguments.get("init_weights") is None


def variant_name(path: Path) -> str:
    """The ``--variants`` name of an ablation file: ``tasks_cls_seg.yaml`` -> ``tasks-cls-seg``."""
    return path.stem.replace("_", "-")


def load_variants(folder: Path = ABLATIONS_DIR) -> dict[str, Variant]:
    """Every ablation config of ``folder`` as a :class:`Variant`, by name, in file-name order.

    Raises:
        MissingInputError: ``folder`` does not exist (the package runs outside its source tree).
        InvalidInputError: A file holds something other than ``model.init_args`` / ``data.init_args`` mappings.
    """
    if not folder.is_dir():
        msg = f"The ablation configs are not at {folder}: --variants needs the source tree's configs/ablations/."
        raise MissingInputError(msg)
    variants = {}
    for path in sorted(folder.glob("*.yaml")):
        content = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(content) - {"model", "data"})
        if unknown:
            msg = f"{path}: an ablation config overrides model and data only, not {unknown}."
            raise InvalidInputError(msg)
        arguments = {}
        for section in ("model", "data"):
            init_args = (content.get(section) or {}).get("init_args") or {}
            if not isinstance(init_args, dict):
                msg = f"{path}: {section}.init_args must be a mapping of constructor arguments."
                raise InvalidInputError(msg)
            arguments[section] = init_args
        variants[variant_name(path)] = Variant(variant_name(path), path, arguments["model"], arguments["data"])
    return variants


def select_variants(names: tuple[str, ...], folder: Path = ABLATIONS_DIR) -> list[Variant]:
    """The variants ``names`` asks for, in that order (repeats dropped), checked before any training.

    Raises:
        InvalidInputError: An unknown name (the message lists the known ones), or a variant that changes
            the split.
    """
    if not names:
        return []
    known = load_variants(folder)
    unknown = [name for name in names if name not in known]
    if unknown:
        msg = f"--variants: unknown {unknown}; known (from {folder}): {', '.join(known)}."
        raise InvalidInputError(msg)
    selected = [known[name] for name in dict.fromkeys(names)]
    splitting = [variant for variant in selected if variant.changes_split]
    if splitting:
        described = ", ".join(
            f"{variant.name} (sets {sorted(SPLIT_ARGUMENTS & variant.data_arguments.keys())})" for variant in splitting
        )
        msg = (
            f"--variants {described}: these change the split, so they cannot be compared on the same test images; "
            "run a separate benchmark with --num-anomalies N instead."
        )
        raise InvalidInputError(msg)
    return selected
