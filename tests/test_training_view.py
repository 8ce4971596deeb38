"""The supervised datamodules serve their anomalies only to a model that trains on them.

anomalib's ``Patchcore`` fitted on ``SupervisedMVTecAD`` through the Engine (``anomalib train --model
Patchcore --data SupervisedMVTecAD``, or the grid of ``anomalib benchmark``) must build the memory bank
of the normal training images only, the one it builds from ``normal_train_dataloader()``; AnomalousPatchCore
still gets the supervised batches with the moved anomalies.
"""

from pathlib import Path

import pytest
import torch
from anomalib.models import Patchcore
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from anomalib_apc.contracts import AnomalyTrainee, trains_on_anomalous_images
from anomalib_apc.data import SupervisedMVTecAD
from tests.conftest import TINY_IMAGE_SIZE, TinyDataset, tiny_apc_model, tiny_engine


def _datamodule(dataset: TinyDataset) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(root=dataset.root, category=dataset.category, num_anomalies=4, train_batch_size=4,
                             eval_batch_size=4, num_workers=0, seed=0)


def _patchcore() -> Patchcore:
    seed_everything(0)
    return Patchcore(backbone="resnet18", pre_trained=False, coreset_sampling_ratio=1.0, visualizer=False,
                     pre_processor=Patchcore.configure_pre_processor(image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)))


class _TrainingLabels(Callback):
    """Records the labels of every training batch."""

    def __init__(self) -> None:
        self.labels: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.labels += batch.gt_label.int().tolist()


def test_the_model_declares_the_attribute_the_datamodule_reads() -> None:
    model = tiny_apc_model()
    assert isinstance(model, AnomalyTrainee) and trains_on_anomalous_images(model)
    assert not trains_on_anomalous_images(Patchcore)
    assert not trains_on_anomalous_images(type("Declines", (), {"trains_on_anomalous_images": False})())


@pytest.mark.integration
def test_patchcore_on_the_supervised_datamodule_builds_the_memory_bank_of_the_normal_images(
    tiny_dataset: TinyDataset, tmp_path: Path
) -> None:
    through_engine, reference = _patchcore(), _patchcore()
    for ours, theirs in zip(through_engine.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)  # one random initialisation
    labels = _TrainingLabels()
    seed_everything(0)
    tiny_engine(tmp_path / "engine", callbacks=[labels]).fit(through_engine, datamodule=_datamodule(tiny_dataset))

    datamodule = _datamodule(tiny_dataset)
    datamodule.setup()
    seed_everything(0)
    tiny_engine(tmp_path / "reference").fit(reference, train_dataloaders=datamodule.normal_train_dataloader())

    assert labels.labels == [0] * tiny_dataset.train_normal  # each real normal image once, nothing else
    assert through_engine.model.memory_bank.shape == reference.model.memory_bank.shape
    # ratio 1.0 keeps every patch; the greedy order follows the random state, so compare the rows as sets
    assert torch.equal(torch.unique(through_engine.model.memory_bank, dim=0),
                       torch.unique(reference.model.memory_bank, dim=0))


@pytest.mark.integration
def test_apc_still_gets_the_supervised_batches(tiny_dataset: TinyDataset, tmp_path: Path) -> None:
    labels = _TrainingLabels()
    model = tiny_apc_model(finetune_precision="32")
    tiny_engine(tmp_path, callbacks=[labels]).fit(model, datamodule=_datamodule(tiny_dataset))
    assert 1 in labels.labels  # the moved anomalies (and CutPaste) reach the fine-tuning
    assert len(labels.labels) > tiny_dataset.train_normal  # balanced draws oversample the 4 anomalies
