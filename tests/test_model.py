"""AnomalousPatchCore's network: head shapes, task switches, loss, errors, fine-tuning steps."""

import pytest
import torch
from anomalib.data import ImageBatch

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore, AnomalousPatchCoreModel
from anomalib_apc.models.apc.loss import ApcLoss
from anomalib_apc.models.apc.torch_model import TASKS
from anomalib_apc.sampling import concatenate_releasing

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("decoder", "pixel_size", "skips"),
    [("unet2", IMAGE_SIZE // 2, ["layer3", "layer2"]), ("unet4", IMAGE_SIZE, ["layer3", "layer2", "layer1", "act1"])],
)
def test_head_shapes(images: torch.Tensor, decoder: str, pixel_size: int, skips: list[str]) -> None:
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, decoder=decoder)
    outputs = model.finetune_forward(images)
    assert outputs.classification.shape == (2,)
    assert outputs.segmentation.shape == (2, 1, pixel_size, pixel_size)
    assert outputs.reconstruction.shape == (2, 3, pixel_size, pixel_size)
    encoder = model.feature_extractor
    assert [encoder.stage_names[index] for index in model.finetune_network.decoder.skip_indices] == skips


@pytest.mark.parametrize(
    ("backbone", "layers"),
    [("efficientnet_b0", ("blocks.2", "blocks.4")), ("resnet34", ("layer2", "layer3"))],
)
def test_other_timm_backbones(images: torch.Tensor, backbone: str, layers: tuple[str, str]) -> None:
    model = AnomalousPatchCoreModel(backbone=backbone, layers=layers, pre_trained=False)
    assert all(output is not None for output in model.finetune_forward(images))
    embedding = model.eval().embedding_map(images)
    encoder = model.feature_extractor
    channels = sum(encoder.stage_channels[index] for index in encoder.memory_bank_indices)
    assert embedding.shape == (2, channels, IMAGE_SIZE // 8, IMAGE_SIZE // 8)


@pytest.mark.parametrize(
    "tasks", [(), ("classification",), ("segmentation",), ("classification", "segmentation"), TASKS]
)
def test_each_task_switch_changes_the_loss_terms(images: torch.Tensor, tasks: tuple[str, ...]) -> None:
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, tasks=tasks)
    if not tasks:
        assert model.finetune_network is None
        return
    outputs = model.finetune_forward(images)
    assert {task for task, output in zip(TASKS, outputs, strict=True) if output is not None} == set(tasks)
    weights = dict(zip(TASKS, (10.0, 1.0, 1.0), strict=True))
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE)
    masks[1, 10:20, 10:20] = 1
    terms = ApcLoss(weights)(outputs, images=images, labels=labels, masks=masks)
    assert set(terms) == {*tasks, "total"}
    expected_total = sum(weights[task] * terms[task] for task in tasks)
    assert torch.isclose(terms["total"], expected_total)
    assert all(torch.isfinite(value) for value in terms.values())


def test_loss_weights_scale_their_term(images: torch.Tensor) -> None:
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, tasks=("classification", "reconstruction"))
    outputs = model.finetune_forward(images)
    labels = torch.tensor([0, 1])
    light = ApcLoss({"classification": 1.0, "reconstruction": 1.0})(outputs, images, labels, None)
    heavy = ApcLoss({"classification": 5.0, "reconstruction": 1.0})(outputs, images, labels, None)
    assert torch.isclose(heavy["total"] - light["total"], 4 * light["classification"])


def test_fine_tuning_steps_reduce_the_loss(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False, finetune_epochs=1, learning_rate=1e-3)
    optimizer = model.configure_optimizers()
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE)
    masks[1, 8:24, 30:50] = 1
    losses = []
    for _ in range(8):
        terms = model.loss(model.model.finetune_forward(images), images, labels, masks)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("classification", "denoising")}, "Unknown task"),
        ({"decoder": "unet3"}, "decoder must be one of"),
        ({"layers": ("layer2", "layer9")}, "are not feature stages"),
        ({"loss_weights": (1.0, 1.0)}, "loss_weights must be 3"),
        ({"coreset_sampling_ratio": 0.0}, "coreset_sampling_ratio"),
        ({"backbone": "no_such_network"}, "Unknown timm backbone"),
        ({"num_neighbors": 0}, "num_neighbors must be >= 1"),
        ({"finetune_epochs": -1}, "finetune_epochs must be >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    arguments = {"backbone": "resnet18", "pre_trained": False, **kwargs}
    with pytest.raises(InvalidInputError, match=message) as raised:
        AnomalousPatchCore(**arguments)
    assert isinstance(raised.value, ValueError)  # callers that catch ValueError keep working


def test_more_neighbours_than_memory_bank_rows_is_refused_before_the_coreset() -> None:
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False, num_neighbors=6)
    expected = r"num_neighbors=6 exceeds the memory bank's 5 rows \(10 normal patches, coreset_sampling_ratio=0.5\)"
    with pytest.raises(InvalidInputError, match=expected):
        model.check_normal_patches(10, sampling_ratio=0.5)
    model.check_normal_patches(10, sampling_ratio=0.6)  # 6 rows: enough


def test_empty_memory_bank_is_refused() -> None:
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False)
    with pytest.raises(InvalidInputError, match="memory bank would be empty"):
        model.check_normal_patches(0, sampling_ratio=0.1)


def test_scores_before_a_memory_bank_is_built_are_refused(images: torch.Tensor) -> None:
    model = AnomalousPatchCoreModel(backbone="resnet18", pre_trained=False).eval()
    with pytest.raises(ValueError, match="Memory bank is empty"):
        model(images)


def test_no_fine_tuning_means_no_optimizer_and_one_epoch() -> None:
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False, tasks=())
    assert model.configure_optimizers() is None
    assert model.trainer_arguments["max_epochs"] == 1
    tuned = AnomalousPatchCore(backbone="resnet18", pre_trained=False, finetune_epochs=7)
    assert tuned.trainer_arguments["max_epochs"] == 7
    assert tuned.trainer_arguments["check_val_every_n_epoch"] == 7


def test_concatenate_releasing_matches_cat_and_empties_its_input() -> None:
    chunks = [torch.randn(n, 5) for n in (3, 1, 4)]
    expected = torch.cat(chunks)
    assert torch.equal(concatenate_releasing(chunks), expected)
    assert chunks == []
    assert concatenate_releasing([]).numel() == 0


def test_anomalous_training_images_without_masks_are_named_with_the_fix(images: torch.Tensor) -> None:
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False)
    model.on_train_epoch_start()
    batch = ImageBatch(image=images[:2], gt_label=torch.tensor([0, 1]), image_path=["good/000.png", "crack/001.png"])
    with pytest.raises(ValueError, match=r"without masks \(\['crack/001.png'\]\).*drop 'segmentation'"):
        model.training_step(batch)
