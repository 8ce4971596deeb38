"""The localisation candidates: batch-norm statistics re-estimated on normal images, segmentation fusion.

References are hand-computed: the per-channel mean and variance of each batch-norm layer's input
over the normal images, and PatchCore's own map times the segmentation head's probability.
"""

import copy

import pytest
import torch
from anomalib.data import ImageBatch
from conftest import tiny_apc_model
from torch import nn

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models.apc.encoder import TimmEncoder
from anomalib_apc.models.apc.memory_bank import reestimate_batchnorm_statistics
from anomalib_apc.models.apc.normal_images import normal_training_images
from anomalib_apc.models.apc.torch_model import AnomalousPatchCoreModel


def _batchnorm_inputs(encoder: TimmEncoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every batch-norm layer of a copy of ``encoder`` in a train-mode pass (batch statistics).

    That is what each layer sees while its statistics are estimated: the layers before it normalise
    with the statistics of the batch.
    """
    encoder = copy.deepcopy(encoder).train()
    inputs: dict[str, torch.Tensor] = {}
    for name, module in encoder.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(lambda _module, args, _output, name=name: inputs.__setitem__(name, args[0]))
    with torch.no_grad():
        encoder.forward_all_stages(images)
    return inputs


def test_batchnorm_statistics_become_those_of_the_normal_images() -> None:
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet18", ["layer2", "layer3"]).eval()
    images = torch.randn(6, 3, 64, 64) * 2 + 1
    batches = [images[:3], images[3:]]
    expected_inputs = [_batchnorm_inputs(encoder, batch) for batch in batches]
    reestimate_batchnorm_statistics(encoder, batches, transform=None, device=torch.device("cpu"))

    assert not encoder.training, "the encoder's eval mode must be kept"
    batchnorms = {name: module for name, module in encoder.named_modules() if isinstance(module, nn.BatchNorm2d)}
    assert "model.layer4.1.bn2" in batchnorms  # deeper than the memory bank: the decoder reads it
    for name, module in batchnorms.items():
        # momentum None: the cumulative average of the two batches' statistics, per channel
        halves = [inputs[name].transpose(0, 1).flatten(1) for inputs in expected_inputs]
        mean = sum(half.mean(1) for half in halves) / 2
        var = sum(half.var(1, unbiased=True) for half in halves) / 2
        torch.testing.assert_close(module.running_mean, mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(module.running_var, var, rtol=1e-4, atol=1e-5, msg=name)
        assert module.momentum == 0.1, "the layer's own momentum must be restored"


def _memory_bank_model(**arguments: object) -> AnomalousPatchCoreModel:
    torch.manual_seed(0)
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, num_neighbors=3, **arguments)
    model.eval()
    with torch.no_grad():
        model.memory_bank = model.patch_embeddings(torch.randn(4, 3, 64, 64))[::7].clone()
    return model


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_segmentation_fusion_weights_patchcores_map_by_the_defect_probability(exponent: float) -> None:
    model = _memory_bank_model(segmentation_fusion=exponent)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fused = model(images)
        model.segmentation_fusion = 0.0
        plain = model(images)
        logits = model.finetune_network.segmentation_logits(model.feature_extractor.forward_all_stages(images))
    probability = torch.sigmoid(nn.functional.interpolate(logits, size=(64, 64), mode="bilinear"))
    torch.testing.assert_close(fused.pred_score, plain.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(fused.anomaly_map, plain.anomaly_map * probability**exponent)
    assert not torch.allclose(fused.anomaly_map, plain.anomaly_map)


def test_segmentation_fusion_needs_the_segmentation_task() -> None:
    with pytest.raises(InvalidInputError, match="segmentation_fusion"):
        AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, tasks=("classification",),
                                segmentation_fusion=1.0)
    with pytest.raises(InvalidInputError, match="segmentation_fusion"):
        AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, segmentation_fusion=-1.0)


@pytest.mark.parametrize("arguments", [{"finetune_epochs": 0}, {"finetune_scope": "batchnorm_statistics"}])
def test_segmentation_fusion_refuses_an_untrained_segmentation_head(arguments: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError, match=r"segmentation_fusion=1.0 needs a trained segmentation head"):
        tiny_apc_model(segmentation_fusion=1.0, **arguments)


def test_memory_bank_reads_the_reestimated_statistics(tiny_dataset, train_tiny_apc) -> None:
    """Same seed and fine-tuning; only phase 2 differs: the statistics are those of the normal images."""

    def datamodule() -> SupervisedMVTecAD:
        return SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3, seed=0,
                                 train_batch_size=4, eval_batch_size=8, num_workers=0)

    paper = train_tiny_apc(datamodule()).model
    reestimated_datamodule = datamodule()
    reestimated = train_tiny_apc(reestimated_datamodule, reestimate_batchnorm=True).model
    for (name, weight), other in zip(paper.model.named_parameters(), reestimated.model.parameters(), strict=True):
        torch.testing.assert_close(weight, other, rtol=0, atol=0, msg=f"{name}: fine-tuning must be identical")

    expected = copy.deepcopy(paper.model.feature_extractor)
    transform = reestimated.pre_processor.transform
    reestimate_batchnorm_statistics(expected, normal_training_images(reestimated_datamodule), transform,
                                    torch.device("cpu"))
    expected_buffers = dict(expected.named_buffers())
    for name, buffer in reestimated.model.feature_extractor.named_buffers():
        torch.testing.assert_close(buffer, expected_buffers[name], msg=name)
    changed = [name for name, buffer in paper.model.feature_extractor.named_buffers()
               if name.endswith("running_mean") and not torch.allclose(buffer, expected_buffers[name])]
    assert changed, "re-estimation on the normal images must change the fine-tuned statistics"
    assert not torch.equal(paper.model.memory_bank, reestimated.model.memory_bank)


def test_fused_model_scores_like_patchcore_and_maps_differently(tiny_dataset, train_tiny_apc) -> None:
    """Through Engine: the image scores of the fused model are the memory bank's, the maps are not."""
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                                   seed=0, train_batch_size=4, eval_batch_size=8, num_workers=0)
    model = train_tiny_apc(datamodule, segmentation_fusion=1.0).model.eval()
    datamodule.setup()
    batch: ImageBatch = next(iter(datamodule.test_dataloader()))
    images = model.pre_processor.transform(batch.image)
    with torch.no_grad():
        fused = model.model(images)
        probability = model.model.defect_probability(images, images.shape[-2:])
        model.model.segmentation_fusion = 0.0
        plain = model.model(images)
    torch.testing.assert_close(fused.pred_score, plain.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(fused.anomaly_map, plain.anomaly_map * probability)
