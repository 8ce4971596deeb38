"""AnomalousPatchCore trained through anomalib's Engine on generated data: both phases, checkpoints, errors."""

import logging
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import tiny_apc_model
from conftest import tiny_engine as _engine
from lightning.pytorch.callbacks import Callback
from torchmetrics.functional.classification import binary_auroc

from anomalib_apc.data import SupervisedMVTecAD, make_demo_dataset
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore

IMAGE_SIZE = 64
NUM_TRAIN = 8


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(
        root, seed=0, image_size=IMAGE_SIZE, num_train=NUM_TRAIN, num_test_normal=4, num_per_defect_type=3
    )
    return root


def _datamodule(root: Path, num_anomalies: int = 3) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(
        root=root, category="demo", num_anomalies=num_anomalies, train_batch_size=4, eval_batch_size=8,
        num_workers=0, seed=0,
    )


def _model(**kwargs: object) -> AnomalousPatchCore:
    arguments = {"image_size": IMAGE_SIZE, "finetune_epochs": 2, "learning_rate": 1e-3, "coreset_sampling_ratio": 1.0}
    return tiny_apc_model(**(arguments | kwargs))


class EpochLosses(Callback):
    """Collects the epoch-mean loss terms that the model logs."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        del pl_module
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_loss")})


class TrainingModes(Callback):
    """Records whether every layer of the network is in train mode during fine-tuning steps."""

    def __init__(self) -> None:
        self.all_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        del trainer, batch, batch_idx
        self.all_training.append(all(module.training for module in pl_module.model.modules()))


@pytest.fixture(scope="module")
def training_modes() -> TrainingModes:
    return TrainingModes()


@pytest.fixture(scope="module")
def trained(
    demo_root: Path, train_tiny_apc, training_modes: TrainingModes
) -> tuple[AnomalousPatchCore, Engine, EpochLosses]:
    torch.manual_seed(0)
    losses = EpochLosses()
    model = _model()
    model.eval()  # as after an inference warm-up: fine-tuning must still update batch-norm statistics
    run = train_tiny_apc(_datamodule(demo_root), callbacks=[losses, training_modes], model=model)
    return run.model, run.engine, losses


def test_fine_tuning_runs_every_layer_in_train_mode(trained, training_modes: TrainingModes) -> None:
    del trained
    assert training_modes.all_training
    assert all(training_modes.all_training)


def test_fine_tuning_logs_finite_per_task_losses(trained: tuple[AnomalousPatchCore, Engine, EpochLosses]) -> None:
    _, _, losses = trained
    assert len(losses.epochs) == 2
    expected = {"train_loss", "train_loss_classification", "train_loss_segmentation", "train_loss_reconstruction"}
    for epoch in losses.epochs:
        assert expected <= set(epoch)
        assert all(torch.isfinite(torch.tensor(value)) for value in epoch.values())


def test_memory_bank_holds_the_patches_of_normal_training_images_only(
    trained: tuple[AnomalousPatchCore, Engine, EpochLosses], demo_root: Path
) -> None:
    model, _, _ = trained
    datamodule = _datamodule(demo_root)
    datamodule.setup()
    model.model.eval()
    transform = model.pre_processor.transform
    normal = torch.cat(
        [model.model.patch_embeddings(transform(batch.image)) for batch in datamodule.normal_train_dataloader()]
    )
    assert normal.shape[0] == NUM_TRAIN * (IMAGE_SIZE // 8) ** 2
    bank = model.model.memory_bank
    assert bank.shape == normal.shape  # coreset_sampling_ratio=1.0 keeps every patch
    distances = torch.cdist(bank, normal, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.amin(dim=1).max() < 1e-4  # every bank row is a normal patch
    assert distances.amin(dim=0).max() < 1e-4  # and every normal patch is in the bank


def test_checkpoint_round_trip_gives_identical_scores(
    trained: tuple[AnomalousPatchCore, Engine, EpochLosses], demo_root: Path, tmp_path: Path
) -> None:
    model, engine, _ = trained
    checkpoint = tmp_path / "apc.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    restored = AnomalousPatchCore.load_from_checkpoint(checkpoint, visualizer=False)
    datamodule = _datamodule(demo_root)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    images = model.pre_processor.transform(batch.image)
    model.model.eval()
    restored.model.eval()
    with torch.no_grad():
        original, reloaded = model.model(images), restored.model(images)
    assert torch.equal(original.pred_score, reloaded.pred_score)
    assert torch.equal(original.anomaly_map, reloaded.anomaly_map)
    assert torch.equal(model.post_processor.image_threshold, restored.post_processor.image_threshold)


def test_engine_test_reports_anomalib_metrics(
    trained: tuple[AnomalousPatchCore, Engine, EpochLosses], demo_root: Path
) -> None:
    model, engine, _ = trained
    datamodule = _datamodule(demo_root)
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    assert {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"} <= set(metrics)
    # The reference: the AUROC of the model's own predictions over the test split, computed here. They are
    # post-processed (anomalib clamps the normalised scores to [0, 1], which can tie scores outside the
    # validation range), as the reported metric's are.
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score for batch in batches])
    labels = torch.cat([batch.gt_label for batch in batches]).int()
    expected = binary_auroc(scores, labels)
    assert metrics["image_AUROC"] == pytest.approx(float(expected), abs=1e-6)


def test_one_class_training_set_is_refused_with_the_fix_before_fine_tuning(demo_root: Path, tmp_path: Path) -> None:
    steps = TrainingModes()  # records one entry per fine-tuning step
    with pytest.raises(InvalidInputError, match="num_anomalies > 0"):
        _engine(tmp_path, [steps]).fit(model=_model(), datamodule=_datamodule(demo_root, num_anomalies=0))
    assert steps.all_training == []  # refused from the datamodule's split counts, before the first step


def test_without_fine_tuning_it_is_plain_patchcore_on_normal_images(demo_root: Path, tmp_path: Path) -> None:
    model = _model(finetune_epochs=0)
    _engine(tmp_path).fit(model=model, datamodule=_datamodule(demo_root, num_anomalies=0))
    assert model.model.memory_bank.shape[0] == NUM_TRAIN * (IMAGE_SIZE // 8) ** 2


def test_missing_initial_weights_do_not_stop_loading_a_checkpoint(
    trained: tuple[AnomalousPatchCore, Engine, EpochLosses], demo_root: Path, tmp_path: Path, caplog
) -> None:
    model, engine, _ = trained
    checkpoint = tmp_path / "apc.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    absent = tmp_path / "weights_on_another_machine.pth"
    with caplog.at_level(logging.WARNING, logger="anomalib_apc.models.apc.lightning_model"):
        restored = AnomalousPatchCore.load_from_checkpoint(checkpoint, init_weights=absent, visualizer=False)
    assert "loading a checkpoint works, training will stop" in caplog.text
    datamodule = _datamodule(demo_root)
    # As `anomalib test --ckpt_path`: the model is built from its arguments, then the trainer restores the checkpoint.
    from_arguments = _model(init_weights=absent)
    tested = _engine(tmp_path).test(model=from_arguments, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)[0]
    expected = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    assert tested == expected
    images = model.pre_processor.transform(next(iter(datamodule.test_dataloader())).image)
    model.model.eval()
    with torch.no_grad():
        assert torch.equal(model.model(images).pred_score, restored.model.eval()(images).pred_score)


def test_training_without_the_initial_weights_stops_with_the_reason(demo_root: Path, tmp_path: Path) -> None:
    absent = tmp_path / "mocov3.pth.tar"
    with pytest.raises(FileNotFoundError, match=r"init_weights file not found: .*mocov3\.pth\.tar"):
        _engine(tmp_path).fit(model=_model(init_weights=absent), datamodule=_datamodule(demo_root))


def test_a_training_batch_without_labels_is_refused_with_the_fix() -> None:
    from anomalib.data import ImageBatch

    from anomalib_apc.models.apc.checks import training_labels

    labels = training_labels(ImageBatch(image=torch.zeros(2, 3, 8, 8), gt_label=torch.tensor([0, 1])))
    assert labels.tolist() == [False, True]
    with pytest.raises(InvalidInputError, match=r"needs image labels \(gt_label\).*supervised datamodule"):
        training_labels(ImageBatch(image=torch.zeros(2, 3, 8, 8)))
