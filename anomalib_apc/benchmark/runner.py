"""Trains anomalib's ``Patchcore`` and ``AnomalousPatchCore`` on one supervised split and measures both.

What makes the comparison fair, and how this module enforces it:

- One split. Each model gets its own ``SupervisedMVTecAD`` built with the same arguments and seed, so
  the same anomalies move to training. APC trains on that train split (normal images, the moved
  anomalies, CutPaste); Patchcore's memory bank reads ``normal_train_dataloader()``, the same normal
  images and nothing else. Both are tested on the test split, which no longer holds the moved
  anomalies. The test images each model was actually scored on are compared afterwards, and a
  difference fails the run instead of producing a misleading table.
- One initialisation. Patchcore's feature extractor receives a copy of APC's encoder weights before
  APC fine-tunes them, so both start from identical weights whether they come from timm's hub, a
  checkpoint file (``init_weights``) or the seeded random generator.
- One measurement. Both go through anomalib's ``Engine`` and are scored by anomalib's ``Evaluator``
  with ``AUROC``, ``F1Max`` (F1 at the F1-optimal threshold) and ``AUPRO`` on the raw scores and maps.
  anomalib's post-processor is left out: its min-max normalisation is monotonic and its adaptive
  threshold is exactly what ``F1Max`` finds, so it would change no figure, but it would cost an extra
  validation pass over the test images for each model.
"""

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.data.datasets.image.mvtecad import CATEGORIES as MVTEC_AD_CATEGORIES
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max
from anomalib.models import Patchcore
from anomalib.models.components import AnomalibModule
from anomalib.models.image.patchcore import torch_model as patchcore_torch_model
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import TQDMProgressBar
from torchmetrics.functional.classification import binary_roc
from tqdm.auto import tqdm

from anomalib_apc.data import SupervisedMVTecAD, make_demo_dataset
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.init_weights import PretrainedWeightsUnavailableError, create_encoder_backbone
from anomalib_apc.sampling import FastKCenterGreedy

logger = logging.getLogger(__name__)

PATCHCORE = "Patchcore"
PATCHCORE_FAST_CORESET = "Patchcore (fast coreset)"
APC = "APC"

DATASETS = ("demo", "mvtecad", "folder")

METRIC_NAMES = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "pixel_AUPRO")
"""Names under which anomalib's ``Evaluator`` reports the metrics of :func:`make_evaluator`."""

ROC_CURVE_POINTS = 400
"""ROC curves are thinned to about this many points: enough for a plot, small enough to keep many."""


@dataclass(frozen=True)
class Profile:
    """The backbone, image size and fine-tuning length used when the user does not choose them."""

    backbone: str
    image_size: int
    finetune_epochs: int


QUICK_PROFILE = Profile(backbone="resnet18", image_size=128, finetune_epochs=5)
"""For the demo dataset: Patchcore and APC both finish in a few minutes on a 2-core CPU."""

PAPER_PROFILE = Profile(backbone="resnet50", image_size=256, finetune_epochs=50)
"""For real data (MVTec AD, folders): the paper's ResNet-50 and 50 epochs, at anomalib's 256 px."""


@dataclass(frozen=True)
class BenchmarkSettings:
    """Everything a benchmark run depends on; ``None`` fields take the dataset's :class:`Profile`.

    Args:
        dataset: ``"demo"`` (generated offline), ``"mvtecad"`` (categories under ``root``) or
            ``"folder"`` (``root`` is one folder in MVTec AD layout).
        root: Dataset root; for ``"demo"`` the folder the demo dataset is written to
            (``output/demo_dataset`` when ``None``).
        categories: MVTec AD categories (all 15 when empty); only for ``"mvtecad"``.
        num_anomalies: Anomalous images moved from the test to the train split for APC.
        seeds: One run per seed: the anomaly choice, CutPaste, random initialisation and coreset.
        backbone: timm CNN name, identical for both models.
        layers: Memory-bank stages, identical for both models.
        image_size: Square input size, identical for both models.
        finetune_epochs: APC's fine-tuning epochs.
        pre_trained: Try timm's ImageNet weights (falls back to random, with a notice, when offline).
        init_weights: Checkpoint file both models start from (torchvision, timm or MoCo v3 format).
        coreset_sampling_ratio: Fraction of normal patches kept in each model's memory bank.
        train_batch_size: APC's fine-tuning batch size (normal and anomalous draws balanced).
        eval_batch_size: Batch size of the memory-bank embedding and of the test.
        num_workers: Dataloader worker processes.
        patchcore_fast_coreset: Also run anomalib's Patchcore with ``FastKCenterGreedy`` (the sampler
            APC uses) as a separate row, so memory-bank times compare like with like.
        output: Folder that receives the tables, figures and each run's files.
        device: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
    """

    dataset: str = "demo"
    root: Path | None = None
    categories: tuple[str, ...] = ()
    num_anomalies: int = 10
    seeds: tuple[int, ...] = (0,)
    backbone: str | None = None
    layers: tuple[str, ...] = ("layer2", "layer3")
    image_size: int | None = None
    finetune_epochs: int | None = None
    pre_trained: bool = True
    init_weights: Path | None = None
    coreset_sampling_ratio: float = 0.1
    train_batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    patchcore_fast_coreset: bool = False
    output: Path = Path("results/benchmark")
    device: str = "auto"

    def resolved(self) -> "BenchmarkSettings":
        """These settings with the profile's values in the fields left ``None``, after checking them.

        Raises:
            ValueError: An unknown dataset, a missing root, categories given for a single folder, or
                no seed.
        """
        if self.dataset not in DATASETS:
            msg = f"dataset must be one of {list(DATASETS)}, got {self.dataset!r}."
            raise ValueError(msg)
        if self.dataset != "demo" and self.root is None:
            msg = f"--dataset {self.dataset} needs --root (the dataset folder)."
            raise ValueError(msg)
        if self.dataset != "mvtecad" and self.categories:
            msg = f"--category selects MVTec AD categories; with --dataset {self.dataset} the category is implied."
            raise ValueError(msg)
        if not self.seeds:
            msg = "Give at least one seed."
            raise ValueError(msg)
        profile = QUICK_PROFILE if self.dataset == "demo" else PAPER_PROFILE
        return replace(
            self,
            backbone=self.backbone or profile.backbone,
            image_size=self.image_size or profile.image_size,
            finetune_epochs=profile.finetune_epochs if self.finetune_epochs is None else self.finetune_epochs,
            categories=tuple(self.categories or (MVTEC_AD_CATEGORIES if self.dataset == "mvtecad" else ())),
        )

    @property
    def model_names(self) -> tuple[str, ...]:
        """The rows each category gets, in table order."""
        return (PATCHCORE, PATCHCORE_FAST_CORESET, APC) if self.patchcore_fast_coreset else (PATCHCORE, APC)

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly copy (paths as strings)."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Initialisation:
    """Where both models' starting weights come from.

    Attributes:
        pre_trained: Load timm's hub weights.
        init_weights: Checkpoint file to load instead.
        description: One line for the report.
        notice: Set when the requested weights could not be had and both models fall back to random.
    """

    pre_trained: bool
    init_weights: Path | None
    description: str
    notice: str | None = None


def resolve_initialisation(settings: BenchmarkSettings) -> Initialisation:
    """Decide once, before any run, which weights both models start from.

    Asking the hub once here (it fails within seconds when offline) keeps every later model creation
    offline and makes the fallback to random weights one clear notice instead of a failure per run.

    Raises:
        FileNotFoundError: ``init_weights`` does not exist.
        IncompatibleCheckpointError: ``init_weights`` does not fit the backbone.
    """
    if settings.init_weights is not None:
        # Read once here: APC defers a missing file to its training, and Patchcore copies APC's weights,
        # so without this check Patchcore would run on random weights labelled as the checkpoint's.
        create_encoder_backbone(settings.backbone, pre_trained=False, init_weights=settings.init_weights)
        return Initialisation(False, settings.init_weights, f"checkpoint {settings.init_weights}")
    if not settings.pre_trained:
        return Initialisation(False, None, "random (--no-pretrained)")
    try:
        create_encoder_backbone(settings.backbone, pre_trained=True)
    except PretrainedWeightsUnavailableError as error:
        logger.info("Pretrained weights unavailable: %s", error)
        notice = (
            f"Pretrained weights for {settings.backbone!r} cannot be had here (no model hub, not in the local "
            "cache), so Patchcore and APC both start from the same random initialisation (one per seed). "
            "Absolute scores are lower than with pretrained weights; pass --init-weights PATH to compare on "
            "a checkpoint you have, or --no-pretrained to ask for random weights explicitly."
        )
        return Initialisation(False, None, "random (pretrained weights unavailable)", notice)
    return Initialisation(True, None, f"timm ImageNet weights of {settings.backbone}")


@dataclass(frozen=True)
class CategoryData:
    """One dataset folder in MVTec AD layout: ``root/category/{train,test,ground_truth}``."""

    root: Path
    category: str


def resolve_categories(settings: BenchmarkSettings) -> list[CategoryData]:
    """The dataset folders of the run; writes the demo dataset first when it is asked for."""
    if settings.dataset == "demo":
        category_dir = make_demo_dataset(settings.root or settings.output / "demo_dataset")
        return [CategoryData(category_dir.parent, category_dir.name)]
    if settings.dataset == "folder":
        folder = Path(settings.root).resolve()
        return [CategoryData(folder.parent, folder.name)]
    return [CategoryData(Path(settings.root), category) for category in settings.categories]


def make_datamodule(settings: BenchmarkSettings, data: CategoryData, seed: int) -> SupervisedMVTecAD:
    """The supervised split of one category for one seed; called once per model with identical arguments."""
    return SupervisedMVTecAD(
        root=data.root,
        category=data.category,
        num_anomalies=settings.num_anomalies,
        seed=seed,
        train_batch_size=settings.train_batch_size,
        eval_batch_size=settings.eval_batch_size,
        num_workers=settings.num_workers,
    )


def make_evaluator() -> Evaluator:
    """anomalib's metrics on raw scores: AUROC and F1 at the F1-optimal threshold per level, and AUPRO."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )


def build_models(settings: BenchmarkSettings, initialisation: Initialisation, seed: int) -> dict[str, AnomalibModule]:
    """APC and anomalib's Patchcore (one or two) with the same backbone, layers, image size and weights."""
    image_size = (settings.image_size, settings.image_size)
    components = {"post_processor": False, "visualizer": False}
    apc = AnomalousPatchCore(
        backbone=settings.backbone,
        layers=settings.layers,
        pre_trained=initialisation.pre_trained,
        init_weights=initialisation.init_weights,
        finetune_epochs=settings.finetune_epochs,
        coreset_sampling_ratio=settings.coreset_sampling_ratio,
        coreset_seed=seed,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=image_size),
        evaluator=make_evaluator(),
        **components,
    )
    models: dict[str, AnomalibModule] = {}
    for name in settings.model_names:
        if name == APC:
            continue
        patchcore = Patchcore(
            backbone=settings.backbone,
            layers=settings.layers,
            pre_trained=False,
            coreset_sampling_ratio=settings.coreset_sampling_ratio,
            pre_processor=Patchcore.configure_pre_processor(image_size=image_size),
            evaluator=make_evaluator(),
            **components,
        )
        copy_initial_weights(apc, patchcore)
        models[name] = patchcore
    models[APC] = apc
    return models


def copy_initial_weights(apc: AnomalousPatchCore, patchcore: Patchcore) -> None:
    """Give Patchcore's feature extractor APC's (not yet fine-tuned) encoder weights.

    Patchcore's timm feature extractor holds the backbone's stages up to the deepest memory-bank
    layer under the same names as APC's full encoder, so every tensor it has must be found.

    Raises:
        RuntimeError: A tensor of Patchcore's extractor is missing from APC's encoder or differs in shape.
    """
    source = apc.model.feature_extractor.model.state_dict()
    target = patchcore.model.feature_extractor.feature_extractor
    unmatched = [
        name for name, tensor in target.state_dict().items()
        if name not in source or source[name].shape != tensor.shape
    ]  # fmt: skip
    if unmatched:
        msg = f"Patchcore's feature extractor does not match APC's encoder; unmatched tensors: {unmatched[:5]}"
        raise RuntimeError(msg)
    target.load_state_dict({name: source[name] for name in target.state_dict()})


@contextmanager
def patchcore_sampler(sampler: type) -> Iterator[None]:
    """Make anomalib's ``PatchcoreModel`` select its coreset with ``sampler`` inside the block.

    anomalib's Patchcore creates its ``KCenterGreedy`` from a module-level name, so replacing that
    name is the one way to give the built-in model another sampler without copying its code.
    """
    with mock.patch.object(patchcore_torch_model, "KCenterGreedy", sampler):
        yield


@dataclass
class TestEvidence:
    """What the figures need from one model's test: ROC curves and a few anomaly maps.

    Attributes:
        image_roc: False and true positive rates over the image scores.
        pixel_roc: The same over all pixels of the anomaly maps (``None`` without masks).
        example_maps: Anomaly maps of the example images by path, scaled to [0, 1] by the range of
            this model's maps over the whole test set, so that colours compare across images.
        example_masks: Ground-truth masks of the example images by path (model resolution).
    """

    image_roc: tuple[np.ndarray, np.ndarray]
    pixel_roc: tuple[np.ndarray, np.ndarray] | None
    example_maps: dict[str, np.ndarray]
    example_masks: dict[str, np.ndarray]


@dataclass
class ModelRun:
    """The outcome of one model on one category and seed; ``error`` is set when it failed.

    Quantities a run does not have stay NaN (``null`` in JSON): Patchcore's fine-tuning time, and
    everything of a failed run.
    """

    model: str
    category: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    finetune_s: float = math.nan
    memory_bank_s: float = math.nan
    inference_ms_per_image: float = math.nan
    memory_bank_rows: int = 0
    memory_bank_dim: int = 0
    num_test_images: int = 0
    num_test_anomalous: int = 0
    error: str | None = None
    test_image_paths: list[str] = field(default_factory=list, repr=False)
    evidence: TestEvidence | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Whether the run finished and has metrics."""
        return self.error is None

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly row without the per-image data."""
        record = asdict(self)
        for bulky in ("test_image_paths", "evidence"):
            record.pop(bulky)
        return record


class RunMeter(Callback):
    """Times one model's phases and records its test predictions.

    - Training passes: from the start of each training epoch to the end of its last batch, data
      loading included; for APC that is the fine-tuning, for Patchcore the embedding pass of its
      memory bank.
    - Memory-bank fit: the model's ``fit()`` (APC: embedding the normal images and the coreset;
      Patchcore: the coreset), timed through :meth:`timing_fit`.
    - Inference: from the start to the end of each test batch, which spans the pre-processor's
      resize and normalisation and the model's forward pass, but not the metric updates (this
      callback runs before the model's evaluator).
    """

    def __init__(self) -> None:
        super().__init__()
        self.training_pass_s = 0.0
        self.fit_s = 0.0
        self.inference_s = 0.0
        self._epoch_start = 0.0
        self._last_batch_end: float | None = None
        self._batch_start = 0.0
        self.image_paths: list[str] = []
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.anomaly_maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    @contextmanager
    def timing_fit(self, model: AnomalibModule) -> Iterator[None]:
        """Time the model's ``fit()`` within the block (anomalib's memory-bank hooks call it by name)."""
        original_fit = model.fit

        def timed_fit() -> None:
            start = time.perf_counter()
            original_fit()
            self.fit_s += time.perf_counter() - start

        model.fit = timed_fit
        try:
            yield
        finally:
            del model.fit

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock of this training pass."""
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Note when the latest batch (optimiser step included) finished."""
        _wait_for_device(pl_module)
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the pass up to its last batch; what follows (the memory-bank fit) is timed apart."""
        if self._last_batch_end is not None:
            self.training_pass_s += self._last_batch_end - self._epoch_start

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Start the clock of this test batch."""
        self._batch_start = time.perf_counter()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        """Stop the clock and keep the raw scores, maps and masks of the batch."""
        _wait_for_device(pl_module)
        self.inference_s += time.perf_counter() - self._batch_start
        self.image_paths.extend(str(path) for path in outputs.image_path)
        self.scores.append(outputs.pred_score.detach().float().cpu().flatten())
        self.labels.append(outputs.gt_label.detach().cpu().flatten().int())
        anomaly_map = outputs.anomaly_map.detach().float().cpu()
        self.anomaly_maps.append(anomaly_map.reshape(len(anomaly_map), *anomaly_map.shape[-2:]))
        if outputs.gt_mask is not None:
            mask = outputs.gt_mask.detach().cpu()
            self.masks.append(mask.reshape(len(mask), *mask.shape[-2:]).bool())

    @property
    def num_test_images(self) -> int:
        """Test images scored so far."""
        return len(self.image_paths)

    def evidence(self, example_paths: Sequence[str]) -> TestEvidence:
        """ROC curves and the scaled maps of ``example_paths`` (which must be test images)."""
        scores, labels = torch.cat(self.scores), torch.cat(self.labels)
        maps = torch.cat(self.anomaly_maps)
        masks = torch.cat(self.masks) if len(self.masks) == len(self.anomaly_maps) else None
        low, high = float(maps.min()), float(maps.max())
        scaled = (maps - low) / max(high - low, 1e-12)
        index = {path: position for position, path in enumerate(self.image_paths)}
        return TestEvidence(
            image_roc=roc_curve(scores, labels),
            pixel_roc=roc_curve(maps.flatten(), masks.flatten().int()) if masks is not None else None,
            example_maps={path: scaled[index[path]].numpy() for path in example_paths},
            example_masks={path: masks[index[path]].numpy() for path in example_paths} if masks is not None else {},
        )

    def labels_by_path(self) -> dict[str, int]:
        """Ground-truth label of every test image."""
        return dict(zip(self.image_paths, torch.cat(self.labels).tolist(), strict=True))


def _wait_for_device(module: LightningModule) -> None:
    """Let queued GPU work finish, so that a clock read afterwards includes it."""
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates, thinned to about ``ROC_CURVE_POINTS`` points (ends kept)."""
    if labels.min() == labels.max():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = binary_roc(scores, labels)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_CURVE_POINTS)).round().astype(int))
    return fpr[keep].numpy(), tpr[keep].numpy()


def select_example_images(labels_by_path: dict[str, int], count: int) -> list[str]:
    """``count`` test images for the side-by-side figure: evenly spread anomalous ones and one normal one.

    Depends only on the test set, so every model's maps of the same images are shown.
    """
    anomalous = sorted(path for path, label in labels_by_path.items() if label == 1)
    normal = sorted(path for path, label in labels_by_path.items() if label == 0)
    num_anomalous = min(len(anomalous), count - 1 if normal else count)
    picks = np.linspace(0, len(anomalous) - 1, num_anomalous).round().astype(int) if num_anomalous else []
    return [anomalous[index] for index in dict.fromkeys(picks)] + normal[:1]


@dataclass
class SplitRun:
    """One category and seed: every model's run."""

    category: str
    seed: int
    runs: list[ModelRun]


def run_split(
    settings: BenchmarkSettings,
    initialisation: Initialisation,
    data: CategoryData,
    seed: int,
    num_example_images: int = 4,
) -> SplitRun:
    """Train and test every model on one category with one seed.

    A model that fails is recorded with its error and the others still run. The models' test sets
    are compared at the end; a difference marks every run of the split as failed.
    """
    split_dir = settings.output / "runs" / _slug(data.category) / f"seed{seed}"
    seed_everything(seed, workers=True)
    models = build_models(settings, initialisation, seed)
    warm_up(models[APC], settings)
    apc_datamodule = make_datamodule(settings, data, seed)
    baseline_datamodule = make_datamodule(settings, data, seed)
    runs: list[ModelRun] = []
    meters: dict[str, RunMeter] = {}
    for name, model in models.items():
        meter = RunMeter()
        run = ModelRun(model=name, category=data.category, seed=seed)
        try:
            seed_everything(seed, workers=True)
            engine = _engine(settings, split_dir / _slug(name), meter)
            with meter.timing_fit(model):
                metrics = _fit_and_test(name, model, engine, apc_datamodule, baseline_datamodule)
            _fill_run(run, model, metrics, meter)
            meters[name] = meter
        except Exception as error:  # one failing model must not lose the others' results
            logger.exception("%s failed on %s, seed %d", name, data.category, seed)
            run.error = f"{type(error).__name__}: {error}"
        runs.append(run)

    finished = [run for run in runs if run.ok]
    mismatch = describe_split_mismatch(finished, apc_datamodule, baseline_datamodule)
    if mismatch:
        for run in finished:
            run.error = f"Split mismatch: {mismatch}"
    elif finished:
        labels_by_path = meters[finished[0].model].labels_by_path()
        examples = select_example_images(labels_by_path, num_example_images)
        for run in finished:
            run.evidence = meters[run.model].evidence(examples)
    return SplitRun(data.category, seed, runs)


def warm_up(model: AnomalousPatchCore, settings: BenchmarkSettings) -> None:
    """Run the encoder once on a full batch before anything is timed.

    The first forward pass of a batch shape pays one-off costs (oneDNN kernel selection, memory
    pools), which would otherwise fall on whichever model runs first (Patchcore). Patchcore's
    extractor is the same network as APC's encoder, so warming one warms the shapes for both.

    The modes of the encoder's modules are restored afterwards: Lightning keeps the modes it finds, so
    an encoder left in eval mode would fine-tune with frozen batch-norm statistics.
    """
    encoder = model.model.feature_extractor
    modes = {module: module.training for module in encoder.modules()}
    images = torch.zeros(settings.eval_batch_size, 3, settings.image_size, settings.image_size)
    with torch.inference_mode():
        encoder.eval()(images)
    for module, training in modes.items():
        module.training = training


def _fit_and_test(
    name: str,
    model: AnomalibModule,
    engine: Engine,
    apc_datamodule: SupervisedMVTecAD,
    baseline_datamodule: SupervisedMVTecAD,
) -> dict[str, float]:
    """Train one model on its view of the split and return the evaluator's test metrics.

    APC trains on the whole supervised datamodule (its memory bank reads the normal images itself);
    Patchcore's single training pass reads the normal training images only. Both test on the test split.
    """
    if name == APC:
        engine.fit(model, datamodule=apc_datamodule)
        return engine.test(model, datamodule=apc_datamodule, verbose=False)[0]
    baseline_datamodule.setup()
    with patchcore_sampler(FastKCenterGreedy) if name == PATCHCORE_FAST_CORESET else nullcontext():
        engine.fit(model, train_dataloaders=baseline_datamodule.normal_train_dataloader())
    return engine.test(model, dataloaders=baseline_datamodule.test_dataloader(), verbose=False)[0]


def _engine(settings: BenchmarkSettings, root_dir: Path, meter: RunMeter) -> Engine:
    """anomalib's Engine without logger, checkpoint files or the validation pass (see the module docstring).

    Progress is shown with tqdm bars, like the models' own embedding and coreset bars: Lightning's
    default rich bar redirects the output streams, and a tqdm bar written into that redirection
    inside Jupyter recurses until it fails (Textualize/rich#3390).
    """
    return Engine(
        default_root_dir=root_dir,
        logger=False,
        callbacks=[meter, ModelCheckpoint(save_top_k=0), TQDMProgressBar()],
        accelerator=settings.device,
        limit_val_batches=0,
        enable_model_summary=False,
    )


def _fill_run(run: ModelRun, model: AnomalibModule, metrics: dict[str, float], meter: RunMeter) -> None:
    missing = [name for name in METRIC_NAMES if name not in metrics]
    if missing:
        msg = f"the evaluator reported no {missing} (does the test set have anomalies and masks?)"
        raise RuntimeError(msg)
    run.metrics = {name: float(metrics[name]) for name in METRIC_NAMES}
    if isinstance(model, AnomalousPatchCore):
        run.finetune_s, run.memory_bank_s = meter.training_pass_s, meter.fit_s
    else:
        run.memory_bank_s = meter.training_pass_s + meter.fit_s  # Patchcore has no fine-tuning: finetune_s stays NaN
    run.num_test_images = meter.num_test_images
    run.num_test_anomalous = sum(meter.labels_by_path().values())
    run.inference_ms_per_image = 1000 * meter.inference_s / max(meter.num_test_images, 1)
    run.memory_bank_rows, run.memory_bank_dim = (int(size) for size in model.model.memory_bank.shape)
    run.test_image_paths = list(meter.image_paths)


def describe_split_mismatch(
    runs: Sequence[ModelRun],
    apc_datamodule: SupervisedMVTecAD,
    baseline_datamodule: SupervisedMVTecAD,
) -> str | None:
    """Describe how the models' data differ, or ``None`` when they saw the same split."""
    tested = {run.model: run.test_image_paths for run in runs}
    reference_model, reference_paths = next(iter(tested.items()), (None, []))
    for model, paths in tested.items():
        if paths != reference_paths:
            only_here = sorted(set(paths) - set(reference_paths))[:3]
            only_there = sorted(set(reference_paths) - set(paths))[:3]
            return (
                f"{model} was tested on {len(paths)} images, {reference_model} on {len(reference_paths)} "
                f"(only in {model}: {only_here}, only in {reference_model}: {only_there})"
            )
    if not (hasattr(apc_datamodule, "train_data") and hasattr(baseline_datamodule, "train_data")):
        return None  # a datamodule that never set up belongs to a failed run, already reported
    if apc_datamodule.supervised_anomaly_paths != baseline_datamodule.supervised_anomaly_paths:
        return "the two datamodules moved different anomalies to training"
    if _normal_training_paths(apc_datamodule) != _normal_training_paths(baseline_datamodule):
        return "the two datamodules hold different normal training images"
    return None


def _normal_training_paths(datamodule: SupervisedMVTecAD) -> list[str]:
    samples = datamodule.train_data.samples
    return sorted(samples.image_path[samples.label_index == 0])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


@dataclass
class BenchmarkResult:
    """All runs of a benchmark, with the settings and initialisation they used."""

    settings: BenchmarkSettings
    initialisation: Initialisation
    device: str
    splits: list[SplitRun] = field(default_factory=list)

    @property
    def runs(self) -> list[ModelRun]:
        """Every model run, in the order they ran."""
        return [run for split in self.splits for run in split.runs]

    @property
    def failures(self) -> list[str]:
        """One line per failed run."""
        return [f"{run.model} on {run.category}, seed {run.seed}: {run.error}" for run in self.runs if not run.ok]


def describe_device(accelerator: str) -> str:
    """The device the runs use, as the report names it next to the timings."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return f"{accelerator}: {torch.cuda.get_device_name()}"
    return f"{accelerator}: CPU, {torch.get_num_threads()} threads"


def run_benchmark(
    settings: BenchmarkSettings,
    on_split_done: Callable[[BenchmarkResult], None] | None = None,
) -> BenchmarkResult:
    """Run every category and seed; ``on_split_done`` is called after each (e.g. to write partial results).

    A category whose data cannot be read fails its own runs; the others go on.
    """
    settings = settings.resolved()
    initialisation = resolve_initialisation(settings)
    if initialisation.notice:
        logger.warning(initialisation.notice)
    result = BenchmarkResult(settings, initialisation, describe_device(settings.device))
    categories = resolve_categories(settings)
    jobs = [(data, seed) for data in categories for seed in settings.seeds]
    progress = tqdm(jobs, desc="Benchmark", unit="split")
    for data, seed in progress:
        progress.set_postfix_str(f"{data.category}, seed {seed}")
        split = run_split(settings, initialisation, data, seed)
        result.splits.append(split)
        if on_split_done is not None:
            on_split_done(result)
    return result
