"""The supervised split's arguments, declared once for both supervised datamodules.

anomalib's CLI (jsonargparse) builds a datamodule's options from its ``__init__`` signature and
docstring, so :class:`.folder.SupervisedFolder` and :class:`.mvtecad.SupervisedMVTecAD` must each
list these arguments by name. Their defaults come from :data:`SPLIT_DEFAULTS`, the shared part of
their documentation from :func:`documents_split_arguments`, and :meth:`SplitArguments.of` collects
them from the constructor's arguments, so neither value nor help is written twice.
"""

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from anomalib_apc.data.annotations import TRAINING_ANNOTATIONS, TrainingAnnotation
from anomalib_apc.errors import InvalidInputError, check_choice


@dataclass(frozen=True)
class SplitArguments:
    """What the supervised split moves to training and how fine-tuning draws from it (documented below)."""

    num_anomalies: int = 10
    balanced_sampling: bool = True
    cutpaste_probability: float = 0.5
    cutpaste_brightness: float = 0.2
    cutpaste_saturation: float = 0.5
    cutpaste_rotation_degrees: float = 90.0
    basic_augmentations: bool = True
    boxes: str | Path | None = None
    training_annotation: TrainingAnnotation = "as_given"

    def __post_init__(self) -> None:
        """Refuse values no split can use, when the datamodule is built (before any data is read)."""
        if self.num_anomalies < 0:
            msg = f"num_anomalies must be 0 or more, got {self.num_anomalies}."
            raise InvalidInputError(msg)
        if not 0.0 <= self.cutpaste_probability <= 1.0:
            msg = f"cutpaste_probability must lie in [0, 1], got {self.cutpaste_probability}."
            raise InvalidInputError(msg)
        check_choice("training_annotation", self.training_annotation, TRAINING_ANNOTATIONS)

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> "SplitArguments":
        """The split arguments among a constructor's ``arguments`` (its ``locals()``)."""
        return cls(**{argument.name: arguments[argument.name] for argument in fields(cls)})


SPLIT_DEFAULTS = SplitArguments()
"""The defaults both datamodules' signatures show."""

SHARED_ARGUMENT_DOCS = """\
balanced_sampling: Draw normal and anomalous training images equally often.
cutpaste_probability: Probability that an anomalous training draw is replaced by a CutPaste anomaly.
cutpaste_brightness: Brightness jitter of pasted defects.
cutpaste_saturation: Saturation jitter of pasted defects.
cutpaste_rotation_degrees: Largest rotation of pasted defects (they are also flipped at random).
basic_augmentations: Flip, warp slightly (rotation, shift, zoom) and colour-jitter every
    fine-tuning sample, real or CutPaste, image and mask alike (the paper's basic augmentations);
    never the memory bank's images, validation or test. With ``cutpaste_probability=0`` the
    fine-tuning sees these augmentations only, as in the paper's "without CutPaste" ablation.
training_annotation: ``"as_given"`` trains on each anomaly's finest annotation; ``"box"`` and
    ``"label"`` reduce the training anomalies' masks to boxes or to nothing, to measure what
    cheaper annotation costs (the test set keeps its masks)."""
"""The ``Args:`` entries that read the same for both datamodules (``num_anomalies`` and ``boxes`` differ)."""

SHARED_ARGUMENTS_MARKER = "{shared split arguments}"

Documented = TypeVar("Documented", bound=type)


def documents_split_arguments(datamodule: Documented) -> Documented:
    """Class decorator: the line ``{shared split arguments}`` of the docstring becomes :data:`SHARED_ARGUMENT_DOCS`.

    The docstring is cleaned first (``inspect.cleandoc``), so the entries take the marker's indent.

    Raises:
        ValueError: The docstring has no marker line (a programming error, raised on import).
    """
    lines = inspect.cleandoc(datamodule.__doc__ or "").splitlines()
    marked = [number for number, line in enumerate(lines) if line.strip() == SHARED_ARGUMENTS_MARKER]
    if len(marked) != 1:
        msg = f"{datamodule.__name__}'s docstring needs one line {SHARED_ARGUMENTS_MARKER!r}."
        raise ValueError(msg)
    indent = lines[marked[0]][: len(lines[marked[0]]) - len(lines[marked[0]].lstrip())]
    shared = [indent + line for line in SHARED_ARGUMENT_DOCS.splitlines()]
    datamodule.__doc__ = "\n".join([*lines[: marked[0]], *shared, *lines[marked[0] + 1 :]])
    return datamodule
