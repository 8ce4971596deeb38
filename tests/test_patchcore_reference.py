"""APC's second phase is PatchCore's: 3x3-pooled stage features, and the re-weighted nearest-neighbour score,
checked against values computed by hand from the encoder's raw stages."""

import math

import pytest
import torch
from torch.nn import functional as F

from anomalib_apc.models import AnomalousPatchCoreModel

IMAGE_SIZE = 64


def model_and_images() -> tuple[AnomalousPatchCoreModel, torch.Tensor]:
    torch.manual_seed(0)
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, num_neighbors=3).eval()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    return model, images


def hand_embedding(model: AnomalousPatchCoreModel, images: torch.Tensor) -> torch.Tensor:
    """layer2 and layer3, each averaged over its 3x3 neighbourhood, layer3 upsampled bilinearly, joined."""
    with torch.no_grad():
        stages = model.feature_extractor(images)
    layer2 = F.avg_pool2d(stages["layer2"], kernel_size=3, stride=1, padding=1)
    layer3 = F.avg_pool2d(stages["layer3"], kernel_size=3, stride=1, padding=1)
    layer3 = F.interpolate(layer3, size=layer2.shape[-2:], mode="bilinear")
    return torch.cat([layer2, layer3], dim=1)


def test_patch_embedding_is_the_3x3_average_of_the_memory_bank_stages() -> None:
    model, images = model_and_images()
    expected = hand_embedding(model, images)
    with torch.no_grad():
        embedding = model.embedding_map(images)
    assert embedding.shape == (2, 128 + 256, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    assert torch.allclose(embedding, expected, atol=1e-5)
    with torch.no_grad():
        unpooled = torch.cat([model.feature_extractor(images)["layer2"], expected[:, 128:]], dim=1)
    assert not torch.allclose(embedding, unpooled, atol=1e-2)  # the pooling matters on these features


def test_image_score_is_the_reweighted_largest_nearest_neighbour_distance() -> None:
    model, images = model_and_images()
    patches = hand_embedding(model, images).permute(0, 2, 3, 1).reshape(2, -1, 384)
    # A tiny hand-built memory bank: a few patches of the first image, slightly moved, and random rows.
    generator = torch.Generator().manual_seed(2)
    bank = torch.cat([patches[0, ::7] + 0.01 * torch.randn(10, 384, generator=generator),
                      torch.randn(5, 384, generator=generator)])
    model.memory_bank = bank
    with torch.no_grad():
        output = model(images)

    for image in range(2):
        distances = torch.cdist(patches[image].double(), bank.double())
        nearest, nearest_index = distances.min(dim=1)
        worst = int(nearest.argmax())
        largest = float(nearest[worst])  # s* of the paper
        neighbour = bank[nearest_index[worst]].double()  # m*
        support = torch.cdist(neighbour[None], bank.double())[0].topk(3, largest=False).indices  # N_b(m*)
        to_support = torch.cdist(patches[image, worst][None].double(), bank[support].double())[0]
        # s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*; m* is the first of N_b.
        weight = 1 - math.exp(float(to_support[0])) / float(torch.exp(to_support).sum())
        assert float(output.pred_score[image]) == pytest.approx(weight * largest, rel=1e-4)
        assert float(output.pred_score[image]) < largest  # the re-weighting does something here

    patch_grid = torch.cdist(patches.double(), bank.double()).amin(dim=2).reshape(2, 1, 8, 8)
    assert torch.allclose(
        model.anomaly_map_generator(patch_grid.float(), (IMAGE_SIZE, IMAGE_SIZE)), output.anomaly_map, atol=1e-3
    )

