"""The dataset folders of a benchmark, checked before any training, and the datamodules built on them.

Each model gets its own ``SupervisedMVTecAD`` built with the same arguments and seed, so the same
anomalies move to training. APC trains on that train split (normal images, the moved anomalies,
CutPaste); a baseline fitted on the same datamodule is served the real normal training images only
(the datamodule's one-class view, its ``normal_train_dataloader``). :func:`describe_datamodule_mismatch`
checks afterwards that the datamodules agreed.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_apc.benchmark.results import DEMO_DATASET_DIR
from anomalib_apc.benchmark.settings import MVTEC_LAYOUT, BenchmarkSettings
from anomalib_apc.data import SupervisedMVTecAD, make_demo_dataset
from anomalib_apc.errors import MissingInputError
from anomalib_apc.models.apc.normal_images import normal_training_dataloader

DEMO_CATEGORY = "demo"
"""The category folder ``make_demo_dataset`` writes by default."""
LAYOUT_HELP = "train/good (normal training images), test/<defect type> and ground_truth/<defect type> (masks)"


@dataclass(frozen=True)
class CategoryData:
    """One dataset folder in MVTec AD layout: ``root/category/{train,test,ground_truth}``."""

    root: Path
    category: str


def resolve_categories(settings: BenchmarkSettings, write_demo_dataset: bool = True) -> list[CategoryData]:
    """The dataset folders of the run, each checked; writes the demo dataset first when it is asked for.

    ``write_demo_dataset=False`` (ranks 1..N-1 of ``--devices N``, started once rank 0 has written it)
    reads the demo dataset where rank 0 wrote it instead of writing its files again.

    Raises:
        MissingInputError: ``root`` does not exist, or a folder lacks ``train/good`` (the message
            says what was expected, and where such folders are when ``root`` is one level too high).
    """
    if settings.dataset == "demo":
        root = Path(settings.root or settings.output / DEMO_DATASET_DIR)
        category_dir = make_demo_dataset(root, category=DEMO_CATEGORY) if write_demo_dataset else root / DEMO_CATEGORY
        if not (category_dir / "train" / "good").is_dir():
            msg = f"the demo dataset ({category_dir}) is missing; the first process writes it before the others start."
            raise MissingInputError(msg)
        return [CategoryData(category_dir.parent, category_dir.name)]
    root = Path(settings.root)
    if not root.is_dir():
        msg = f"--root {root}: no such folder."
        raise MissingInputError(msg)
    if settings.dataset == MVTEC_LAYOUT:
        check_mvtec_layout(root, f"--root {root}")
        folder = root.resolve()
        return [CategoryData(folder.parent, folder.name)]
    missing = [category for category in settings.categories if not (root / category).is_dir()]
    if missing:
        present = sorted(path.name for path in root.iterdir() if (path / "train" / "good").is_dir())
        msg = (
            f"--root {root} has no folder for categor{'y' if len(missing) == 1 else 'ies'} "
            f"{', '.join(missing)} ({', '.join(str(root / name) for name in missing[:3])} missing); "
            f"categories there: {', '.join(present) or 'none'}. Nothing is downloaded: put MVTec AD under --root first."
        )
        raise MissingInputError(msg)
    for category in settings.categories:
        check_mvtec_layout(root / category, f"category {category} ({root / category})")
    return [CategoryData(root, category) for category in settings.categories]


def check_mvtec_layout(folder: Path, name: str) -> None:
    """Refuse ``folder`` unless it holds ``train/good``; suggest the sub-folders that do.

    Raises:
        MissingInputError: ``folder/train/good`` is absent.
    """
    if (folder / "train" / "good").is_dir():
        return
    msg = f"{name} is not a folder in MVTec AD layout: expected {LAYOUT_HELP} in it; it has no train/good."
    candidates = sorted(path.name for path in folder.iterdir() if (path / "train" / "good").is_dir())
    if candidates:
        msg += (
            f" It holds folders in that layout ({', '.join(candidates[:5])}): pass --dataset {MVTEC_LAYOUT} --root "
            f"{folder / candidates[0]}, or --dataset mvtecad --root {folder} --category {candidates[0]}."
        )
    raise MissingInputError(msg)


def make_datamodule(
    settings: BenchmarkSettings, data: CategoryData, seed: int, **overrides: Any
) -> SupervisedMVTecAD:
    """The supervised split of one category for one seed; called once per model with identical split arguments.

    ``overrides`` are an APC variant's ``data.init_args`` (e.g. ``cutpaste_probability``, ``training_annotation``);
    they never change the split (the variants that would are refused before).
    """
    arguments = {"training_annotation": settings.training_annotation, **overrides}
    return SupervisedMVTecAD(
        root=data.root,
        category=data.category,
        num_anomalies=settings.num_anomalies,
        seed=seed,
        train_batch_size=settings.train_batch_size,
        eval_batch_size=settings.eval_batch_size,
        num_workers=settings.num_workers,
        **arguments,
    )


def normal_training_paths(datamodule: SupervisedMVTecAD) -> list[str]:
    """Paths of the real normal training images, as the memory banks read them (in order)."""
    return [str(path) for batch in normal_training_dataloader(datamodule) for path in batch.image_path]


def describe_datamodule_mismatch(first: SupervisedMVTecAD, second: SupervisedMVTecAD) -> str | None:
    """Describe how two set-up datamodules' training data differ, or ``None`` when they agree."""
    if first.supervised_anomaly_paths != second.supervised_anomaly_paths:
        return "the two datamodules moved different anomalies to training"
    if normal_training_paths(first) != normal_training_paths(second):
        return "the two datamodules hold different normal training images"
    return None
