"""The benchmark's models: Patchcore draws the same coreset as APC, and the meter times the memory-bank fit."""

import time
from pathlib import Path

import pytest
import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine
from anomalib.models import Patchcore
from lightning.pytorch import Callback

from anomalib_apc.benchmark.meter import RunMeter
from anomalib_apc.benchmark.models import SeededPatchcore, copy_initial_weights
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.normal_images import normal_training_dataloader

pytestmark = pytest.mark.integration

IMAGE_SIZE = (64, 64)
CORESET_SEED = 3
NO_COMPONENTS = {"post_processor": False, "evaluator": False, "visualizer": False}


def _engine(root: Path, callbacks: list[Callback] | None = None) -> Engine:
    return Engine(
        default_root_dir=root,
        logger=False,
        callbacks=[ModelCheckpoint(save_top_k=0), *(callbacks or [])],
        accelerator="cpu",
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _datamodule(tiny_dataset) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(
        root=tiny_dataset.root,
        category=tiny_dataset.category,
        num_anomalies=3,
        eval_batch_size=5,  # several batches, so that their order matters
        num_workers=0,
        seed=0,
    )


def _patchcore(
    apc: AnomalousPatchCore, coreset_seed: int, fast_coreset: bool = False, coreset_sampler: str = "exact"
) -> SeededPatchcore:
    patchcore = SeededPatchcore(
        coreset_seed=coreset_seed,
        fast_coreset=fast_coreset,
        coreset_sampler=coreset_sampler,
        backbone="resnet18",
        pre_trained=False,
        coreset_sampling_ratio=0.1,
        pre_processor=Patchcore.configure_pre_processor(image_size=IMAGE_SIZE),
        **NO_COMPONENTS,
    )
    copy_initial_weights(apc, patchcore)
    return patchcore


def _predict(engine: Engine, model: torch.nn.Module, datamodule: SupervisedMVTecAD) -> tuple[torch.Tensor, ...]:
    batches = engine.predict(model, dataloaders=datamodule.test_dataloader())
    return torch.cat([batch.pred_score for batch in batches]), torch.cat([batch.anomaly_map for batch in batches])


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """APC without tasks (PatchCore on its initial weights) and Patchcore rows on copies of those weights.

    The global random state differs before each training, as after different data loading in a real run.
    """
    root = tmp_path_factory.mktemp("coreset")
    torch.manual_seed(0)
    apcs = {
        f"APC{suffix}": AnomalousPatchCore(
            backbone="resnet18",
            pre_trained=False,
            tasks=(),
            coreset_sampling_ratio=0.1,
            coreset_seed=CORESET_SEED,
            coreset_sampler=sampler,
            seed=0,
            pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=IMAGE_SIZE),
            **NO_COMPONENTS,
        )
        for suffix, sampler in (("", "exact"), (" chunked", "chunked"))
    }
    apc = apcs["APC"]
    patchcores = {
        "same seed": _patchcore(apc, CORESET_SEED),
        "same seed, fast coreset": _patchcore(apc, CORESET_SEED, fast_coreset=True),
        "same seed, chunked coreset": _patchcore(apc, CORESET_SEED, coreset_sampler="chunked"),
        "other seed": _patchcore(apc, CORESET_SEED + 1),
    }
    outputs = {}
    for offset, (name, model) in enumerate(apcs.items()):
        apc_datamodule = _datamodule(tiny_dataset)
        torch.manual_seed(1 + offset)
        engine = _engine(root / name)
        engine.fit(model, datamodule=apc_datamodule)
        outputs[name] = _predict(engine, model, apc_datamodule)
    baseline_datamodule = _datamodule(tiny_dataset)
    baseline_datamodule.setup()
    for offset, (name, patchcore) in enumerate(patchcores.items()):
        torch.manual_seed(100 + offset)
        engine = _engine(root / str(offset))
        engine.fit(patchcore, train_dataloaders=normal_training_dataloader(baseline_datamodule))
        outputs[name] = _predict(engine, patchcore, baseline_datamodule)
    banks = {name: model.model.memory_bank for name, model in (apcs | patchcores).items()}
    return {"outputs": outputs, "banks": banks}


@pytest.mark.parametrize(
    ("name", "apc"),
    [("same seed", "APC"), ("same seed, fast coreset", "APC"), ("same seed, chunked coreset", "APC chunked")],
)
def test_patchcore_with_apcs_coreset_seed_scores_exactly_like_apc_without_tasks(
    trained: dict, name: str, apc: str
) -> None:
    apc_scores, apc_maps = trained["outputs"][apc]
    scores, maps = trained["outputs"][name]
    # 10 % of 12 images x 8 x 8 patches, of layer2 + layer3 channels
    assert trained["banks"][name].shape == trained["banks"][apc].shape == (76, 384)
    torch.testing.assert_close(trained["banks"][name], trained["banks"][apc], rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, apc_scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, apc_maps, rtol=0, atol=1e-6)


def test_the_chunked_sampler_keeps_other_rows_than_the_exact_one(trained: dict) -> None:
    exact = {tuple(row.tolist()) for row in trained["banks"]["APC"]}
    assert len(exact & {tuple(row.tolist()) for row in trained["banks"]["APC chunked"]}) < len(exact)


def test_another_coreset_seed_gives_another_memory_bank_and_scores(trained: dict) -> None:
    """The control: the comparison above can fail (a coreset drawn under another seed differs)."""
    apc_scores, _ = trained["outputs"]["APC"]
    scores, _ = trained["outputs"]["other seed"]
    shared = {tuple(row.tolist()) for row in trained["banks"]["APC"]} & {
        tuple(row.tolist()) for row in trained["banks"]["other seed"]
    }
    assert len(shared) < len(trained["banks"]["APC"])
    assert (scores - apc_scores).abs().max() > 1e-4


class SlowFitPatchcore(SeededPatchcore):
    """A Patchcore whose memory-bank fit takes a known extra time."""

    FIT_DELAY_S = 0.3

    def fit(self) -> None:
        started = time.perf_counter()
        time.sleep(self.FIT_DELAY_S)
        super().fit()
        self.fit_duration_s = time.perf_counter() - started


def test_meter_times_the_memory_bank_fit_apart_from_the_training_pass(tiny_dataset, tmp_path: Path) -> None:
    apc = AnomalousPatchCore(backbone="resnet18", pre_trained=False, tasks=(), **NO_COMPONENTS)
    patchcore = SlowFitPatchcore(
        backbone="resnet18",
        pre_trained=False,
        coreset_sampling_ratio=0.1,
        pre_processor=Patchcore.configure_pre_processor(image_size=IMAGE_SIZE),
        **NO_COMPONENTS,
    )
    copy_initial_weights(apc, patchcore)
    datamodule = _datamodule(tiny_dataset)
    datamodule.setup()
    meter = RunMeter()
    started = time.perf_counter()
    _engine(tmp_path, [meter]).fit(patchcore, train_dataloaders=normal_training_dataloader(datamodule))
    whole_fit_s = time.perf_counter() - started
    # relations only, so that a loaded machine cannot fail it: the memory-bank fit lies within fit_s, and
    # it is not counted again in the training pass (their sum stays within the whole Engine.fit)
    assert patchcore.fit_duration_s >= SlowFitPatchcore.FIT_DELAY_S
    assert patchcore.fit_duration_s <= meter.fit_s
    assert 0 < meter.training_pass_s and meter.training_pass_s + meter.fit_s <= whole_fit_s
