"""Training anomalies known by boxes or by their label alone: reading, the datamodules, the loss, the CLI."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from anomalib_apc.benchmark import cli as benchmark_cli
from anomalib_apc.benchmark.data import CategoryData
from anomalib_apc.benchmark.rows import plan_rows
from anomalib_apc.benchmark.runner import make_datamodules
from anomalib_apc.benchmark.settings import APC, PATCHCORE, BenchmarkSettings
from anomalib_apc.benchmark.variants import select_variants
from anomalib_apc.contracts import Annotation
from anomalib_apc.data import SupervisedFolder, SupervisedMVTecAD
from anomalib_apc.data.annotated_batch import AnnotatedImageBatch
from anomalib_apc.data.boxes import boxes_mask, boxes_of_mask, read_csv_boxes, read_yolo_boxes
from anomalib_apc.errors import InvalidInputError, MissingInputError
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.loss import BOX_SOFT_TARGET, ApcLoss
from anomalib_apc.models.apc.torch_model import FineTuneOutput

REPO = Path(__file__).resolve().parents[1]
SEGMENTATION_ONLY = {"classification": 0.0, "segmentation": 1.0, "reconstruction": 0.0}


# Box files.


def test_yolo_lines_become_normalised_corner_boxes(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("0 0.5 0.25 0.2 0.1\n3 0.1 0.9 0.2 0.2\n\n")
    boxes = read_yolo_boxes(path)
    np.testing.assert_allclose(boxes, [(0.4, 0.2, 0.6, 0.3), (0.0, 0.8, 0.2, 1.0)], atol=1e-9)


def test_boxes_mask_marks_exactly_the_pixels_the_boxes_cover() -> None:
    mask = boxes_mask([(0.25, 0.5, 0.5, 0.75), (0.0, 0.0, 0.125, 0.125)], height=8, width=8)
    expected = torch.zeros(8, 8, dtype=torch.uint8)
    expected[4:6, 2:4] = 1
    expected[0:1, 0:1] = 1
    assert torch.equal(mask, expected)


def test_a_box_thinner_than_a_pixel_still_marks_one() -> None:
    assert int(boxes_mask([(0.5, 0.5, 0.51, 0.51)], height=8, width=8).sum()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"empty"),
        ("0 0.5 0.5 0.2\n", r"line 1: expected 'class cx cy w h'"),
        ("0 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n", r"line 2: the box .* reaches outside the image"),
        ("0 0.5 0.5 0 0.2\n", r"line 1: the box .* is empty"),
        ("0 zero 0.5 0.2 0.2\n", r"line 1: expected"),
    ],
)
def test_bad_yolo_files_are_named_with_their_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad_box.txt"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=rf"bad_box\.txt.*{message}"):
        read_yolo_boxes(path)


def test_csv_boxes_are_pixels_normalised_by_each_images_size(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    (tmp_path / "boxes.csv").write_text("image,x0,y0,x1,y1\na.png,20,10,60,50\na.png,0,0,200,100\n")
    boxes = read_csv_boxes(tmp_path / "boxes.csv")
    assert list(boxes) == [(tmp_path / "a.png").resolve()]
    np.testing.assert_allclose(boxes[(tmp_path / "a.png").resolve()], [(0.1, 0.1, 0.3, 0.5), (0, 0, 1, 1)])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,x0,y0,x1,y1\na.png,1,1,2,2\n", r"unknown format"),
        ("image,x0,y0,x1,y1\n", r"no box"),
        ("image,x0,y0,x1,y1\na.png,10,10,250,20\n", r"line 2: the box .* reaches outside the image \(200 x 100\)"),
        ("image,x0,y0,x1,y1\nmissing.png,1,1,2,2\n", r"line 2: cannot open the image .*missing\.png"),
    ],
)
def test_bad_csv_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    (tmp_path / "boxes.csv").write_text(content)
    with pytest.raises(InvalidInputError, match=rf"boxes\.csv.*{message}"):
        read_csv_boxes(tmp_path / "boxes.csv")


def test_boxes_of_a_mask_are_its_connected_regions() -> None:
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[1:3, 2:5] = 255
    mask[3, 5] = 255  # touches the first region diagonally: the same region
    mask[6:9, 10:18] = 1
    assert sorted(boxes_of_mask(mask)) == [(2 / 20, 1 / 10, 6 / 20, 4 / 10), (10 / 20, 6 / 10, 18 / 20, 9 / 10)]
    assert boxes_of_mask(np.zeros((4, 4))) == []


# Datamodules.


def yolo_line(mask_path: Path) -> str:
    """The YOLO line of the bounding box of a mask's defect pixels."""
    with Image.open(mask_path) as mask:
        x0, y0, x1, y1 = mask.getbbox()
        width, height = mask.size
    return f"0 {(x0 + x1) / 2 / width} {(y0 + y1) / 2 / height} {(x1 - x0) / width} {(y1 - y0) / height}\n"


def make_boxed_folder(tiny_dataset, root: Path, boxed_types: tuple[str, ...]) -> Path:
    """``good/``, ``test_good/`` and ``bad/<type>/`` without masks; YOLO files beside the ``boxed_types`` images."""
    shutil.copytree(tiny_dataset.category_dir / "train" / "good", root / "good")
    shutil.copytree(tiny_dataset.category_dir / "test" / "good", root / "test_good")
    for defect_type in tiny_dataset.defect_types:
        shutil.copytree(tiny_dataset.category_dir / "test" / defect_type, root / "bad" / defect_type)
        if defect_type in boxed_types:
            for image in (root / "bad" / defect_type).glob("*.png"):
                mask = tiny_dataset.category_dir / "ground_truth" / defect_type / f"{image.stem}_mask.png"
                image.with_suffix(".txt").write_text(yolo_line(mask))
    return root


def folder(root: Path, **overrides) -> SupervisedFolder:
    arguments = {"name": "parts", "root": root, "normal_dir": "good", "normal_test_dir": "test_good",
                 "abnormal_dir": "bad", "num_anomalies": 6, "val_split_mode": "same_as_test", "num_workers": 0}
    datamodule = SupervisedFolder(**(arguments | overrides))
    datamodule.setup()
    return datamodule


def training_anomalies(datamodule) -> dict[str, tuple[int, torch.Tensor]]:
    """Each real training anomaly's annotation and gt_mask, as the supervised batches serve them."""
    datamodule.cutpaste_probability = 0.0
    datamodule.basic_augmentations = False
    served = {}
    for batch in datamodule.train_dataloader():
        for path, label, annotation, mask in zip(batch.image_path, batch.gt_label, batch.annotation, batch.gt_mask,
                                                 strict=True):
            if label:
                served[path] = (int(annotation), mask)
    return served


def test_folder_with_yolo_boxes_beside_some_images_and_nothing_beside_others(tiny_dataset, tmp_path) -> None:
    datamodule = folder(make_boxed_folder(tiny_dataset, tmp_path, boxed_types=("scratch", "stain")))
    served = training_anomalies(datamodule)
    assert len(served) == 6
    for path, (annotation, mask) in served.items():
        image = Path(path)
        if image.parent.name == "hole":
            assert annotation == Annotation.LABEL
            assert not mask.any()
        else:
            assert annotation == Annotation.BOX
            expected = boxes_mask(read_yolo_boxes(image.with_suffix(".txt")), *mask.shape)
            assert torch.equal(mask.to(torch.uint8), expected)
    assert datamodule.test_data.task == "classification"  # test anomalies without masks: image metrics only


def test_a_box_folder_mirrors_the_anomalous_folders_and_a_stray_box_file_is_named(tiny_dataset, tmp_path) -> None:
    root = make_boxed_folder(tiny_dataset, tmp_path, boxed_types=("scratch",))
    for box_file in (root / "bad").rglob("*.txt"):
        target = root / "labels" / box_file.relative_to(root / "bad")
        target.parent.mkdir(parents=True, exist_ok=True)
        box_file.rename(target)
    datamodule = folder(root, boxes="labels")
    counts = datamodule.train_data.samples
    boxed = counts[counts.annotation == Annotation.BOX].image_path.map(lambda path: Path(path).parent.name)
    assert set(boxed) == {"scratch"}
    (root / "labels" / "scratch" / "999.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(InvalidInputError, match=r"labels/scratch/999\.txt"):
        folder(root, boxes="labels")
    with pytest.raises(MissingInputError, match=r"boxes .*nowhere: no such file or folder"):
        folder(root, boxes="nowhere")


def test_the_finer_annotation_wins_and_a_bad_box_is_named_at_set_up(tiny_dataset_copy) -> None:
    scratch = tiny_dataset_copy.category_dir / "test" / "scratch"
    for image in scratch.glob("*.png"):
        image.with_suffix(".txt").write_text("0 0.5 0.5 0.2 0.2\n")
    datamodule = SupervisedMVTecAD(root=tiny_dataset_copy.root, category=tiny_dataset_copy.category,
                                   num_anomalies=3, num_workers=0)
    datamodule.setup()
    assert set(datamodule.train_data.samples.annotation) == {Annotation.MASK}
    (scratch / "001.txt").write_text("0 0.5 0.5 0.2 1.5\n")
    with pytest.raises(InvalidInputError, match=r"scratch/001\.txt line 1: the box .* reaches outside"):
        SupervisedMVTecAD(root=tiny_dataset_copy.root, category=tiny_dataset_copy.category, num_workers=0).setup()


def test_an_mvtec_category_without_ground_truth_trains_on_labels_and_tests_image_metrics(tiny_dataset_copy) -> None:
    shutil.rmtree(tiny_dataset_copy.category_dir / "ground_truth")
    datamodule = SupervisedMVTecAD(root=tiny_dataset_copy.root, category=tiny_dataset_copy.category,
                                   num_anomalies=3, num_workers=0)
    datamodule.setup()
    served = training_anomalies(datamodule)
    assert len(served) == 3
    assert all(annotation == Annotation.LABEL and not mask.any() for annotation, mask in served.values())
    assert datamodule.test_data.task == "classification"


def test_masks_reduced_to_boxes_are_their_regions_boxes_and_the_test_keeps_its_masks(tiny_dataset) -> None:
    masked = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=4, num_workers=0)
    boxed = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=4, num_workers=0,
                              training_annotation="box")
    masked.setup()
    boxed.setup()
    masks, boxes = training_anomalies(masked), training_anomalies(boxed)
    assert masks.keys() == boxes.keys()
    for path, (annotation, box_mask) in boxes.items():
        assert annotation == Annotation.BOX
        mask = masks[path][1].numpy()
        assert torch.equal(box_mask.to(torch.uint8), boxes_mask(boxes_of_mask(mask), *mask.shape))
        assert box_mask[torch.from_numpy(mask)].all()  # every defect pixel lies in a box
    assert boxed.test_data.task == "segmentation"
    assert list(boxed.test_data.samples.image_path) == list(masked.test_data.samples.image_path)


def test_real_masks_reduced_to_boxes_cover_every_defect_pixel_at_the_images_own_size(real_categories) -> None:
    for category_dir in real_categories:  # 512 x 512 RGB, 512 x 208 RGB (not square), 640 x 640 greyscale
        datamodule = SupervisedMVTecAD(root=category_dir.parent, category=category_dir.name, num_anomalies=4,
                                       num_workers=2, training_annotation="box")
        datamodule.setup()
        samples = datamodule.train_data.samples
        for index in samples.index[samples.label_index == 1]:
            item = datamodule.train_data[index]
            image = Path(item.image_path)
            mask_path = category_dir / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
            mask = torch.from_numpy(np.asarray(Image.open(mask_path)) > 0)
            assert item.gt_mask.shape == mask.shape == item.image.shape[-2:]
            assert item.gt_mask[mask].all(), f"{item.image_path}: a defect pixel outside every box"
            assert int(item.gt_mask.sum()) < mask.numel() / 2  # boxes, not the whole image


def test_masks_reduced_to_labels_serve_empty_masks_and_give_cutpaste_nothing_to_cut(tiny_dataset, tmp_path) -> None:
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=4,
                                   num_workers=0, training_annotation="label", cutpaste_probability=1.0)
    datamodule.setup()
    for batch in datamodule.train_dataloader():
        anomalous = batch.gt_label.bool()
        assert (batch.annotation[anomalous] == Annotation.LABEL).all()
        assert not batch.gt_mask.any()
    datamodule.save_split(tmp_path)
    record = (tmp_path / "supervised_split.json").read_text()
    assert '"train_annotation_counts": {\n    "mask": 0,\n    "box": 0,\n    "label": 4' in record


def test_cutpaste_from_a_box_pastes_the_box_and_is_annotated_as_one(tiny_dataset) -> None:
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=4,
                                   num_workers=0, training_annotation="box", cutpaste_probability=1.0,
                                   basic_augmentations=False)
    datamodule.setup()
    pasted = [
        (annotation, mask)
        for batch in datamodule.train_dataloader()
        for label, annotation, mask in zip(batch.gt_label, batch.annotation, batch.gt_mask, strict=True)
        if label
    ]
    assert pasted
    assert all(annotation == Annotation.BOX and mask.any() for annotation, mask in pasted)


def test_an_unknown_training_annotation_is_named() -> None:
    with pytest.raises(InvalidInputError, match=r"training_annotation must be one of \['as_given', 'box', 'label'\]"):
        SupervisedMVTecAD(root=".", category="x", training_annotation="boxes")


# The loss.


def segmentation_term(loss: ApcLoss, logits: torch.Tensor, masks: torch.Tensor, annotations) -> torch.Tensor:
    images = torch.zeros(logits.shape[0], 3, *logits.shape[-2:])
    labels = torch.ones(logits.shape[0])
    outputs = FineTuneOutput(None, logits, None)
    return loss(outputs, images, labels, masks, annotations)["segmentation"]


def test_a_known_box_leaves_its_pixels_out_of_the_loss_and_keeps_the_rest_as_normal() -> None:
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:4, 3:6] = 1
    loss = segmentation_term(ApcLoss(SEGMENTATION_ONLY), logits, masks, torch.tensor([Annotation.MASK, Annotation.BOX]))
    per_pixel = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:4, 3:6] = False
    expected = (per_pixel[0].sum() + per_pixel[1, 0][outside].sum()) / (64 + 64 - 6)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert not logits.grad[1, 0, 2:4, 3:6].any()
    assert logits.grad[1, 0][outside].all()


def test_a_soft_box_pulls_its_pixels_towards_the_soft_target() -> None:
    logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(1, 8, 8)
    masks[0, 1:5, 1:5] = 1
    loss = segmentation_term(ApcLoss(SEGMENTATION_ONLY, box_supervision="soft"), logits, masks,
                             torch.tensor([Annotation.BOX]))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, masks[:, None] * BOX_SOFT_TARGET))


def test_a_label_only_batch_contributes_no_segmentation_gradient() -> None:
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    label_only = torch.full((2,), Annotation.LABEL)
    loss = segmentation_term(ApcLoss(SEGMENTATION_ONLY), logits, torch.zeros(2, 8, 8), label_only)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert not logits.grad.any()


def test_the_max_term_trains_each_label_only_images_largest_logit_as_a_defect() -> None:
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    annotations = torch.tensor([Annotation.LABEL, Annotation.MASK])
    loss = segmentation_term(ApcLoss(SEGMENTATION_ONLY, label_supervision="max"), logits, torch.zeros(2, 8, 8),
                             annotations)
    top = logits[0].flatten().max()
    expected = F.binary_cross_entropy_with_logits(logits[1], torch.zeros_like(logits[1])) + F.softplus(-top)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert int((logits.grad[0] != 0).sum()) == 1  # the largest logit alone
    assert logits.grad[0].flatten().argmin() == logits[0].flatten().argmax()


def test_masks_for_every_image_give_the_papers_mean_over_every_pixel() -> None:
    logits = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    masks = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5)) > 0.7).float()
    expected = F.binary_cross_entropy_with_logits(logits, masks[:, None])
    loss = ApcLoss(SEGMENTATION_ONLY)
    torch.testing.assert_close(segmentation_term(loss, logits, masks, torch.zeros(3, dtype=torch.long)), expected)
    torch.testing.assert_close(segmentation_term(loss, logits, masks, None), expected)


@pytest.mark.parametrize(("argument", "value"), [("box_supervision", "inside"), ("label_supervision", "mil")])
def test_unknown_weak_supervision_choices_are_named_at_construction(argument: str, value: str) -> None:
    with pytest.raises(InvalidInputError, match=rf"{argument} must be one of"):
        AnomalousPatchCore(backbone="resnet18", pre_trained=False, **{argument: value})


# Training end to end.


def test_a_training_step_on_label_only_anomalies_trains_no_segmentation(recwarn) -> None:
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False, tasks=("segmentation",), visualizer=False)
    batch = AnnotatedImageBatch(image=torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)),
                                gt_label=torch.tensor([1, 1]), gt_mask=torch.zeros(2, 64, 64), image_path=["a", "b"],
                                annotation=torch.full((2,), Annotation.LABEL))
    model.training_step(batch)["loss"].backward()
    assert not any(parameter.grad is not None and parameter.grad.any() for parameter in model.parameters())
    as_masks = model.training_step(batch.update(in_place=False, annotation=torch.full((2,), Annotation.MASK)))["loss"]
    assert float(as_masks.detach()) > 0.1  # the same all-zero masks read as masks: "no defect anywhere"


@pytest.mark.integration
def test_anomalib_train_on_a_folder_of_boxed_defects(tiny_dataset, tmp_path: Path) -> None:
    root = make_boxed_folder(tiny_dataset, tmp_path / "data", boxed_types=tiny_dataset.defect_types)
    command = [
        sys.executable, "-c", "from anomalib.cli.cli import main; main()", "train",
        "--model", "AnomalousPatchCore", "--model.backbone", "resnet18", "--model.pre_trained", "false",
        "--model.finetune_epochs", "1", "--model.visualizer", "false",
        "--data", "SupervisedFolder", "--data.name", "parts", "--data.root", str(root), "--data.normal_dir", "good",
        "--data.abnormal_dir", "bad", "--data.normal_test_dir", "test_good", "--data.num_anomalies", "6",
        "--data.num_workers", "0", "--data.train_batch_size", "8",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--default_root_dir", str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "6 with boxes" in output
    assert "image_AUROC" in output
    assert "pixel_AUROC" not in output  # the boxed test anomalies have no masks: image metrics only


# The benchmark.


def test_the_benchmarks_annotation_reaches_apcs_datamodules_and_a_variants_own_wins(tiny_dataset) -> None:
    parser = benchmark_cli.build_parser()
    settings = benchmark_cli.settings_from_arguments(parser.parse_args(["--annotation", "box"]))
    assert settings.training_annotation == "box"
    assert BenchmarkSettings().training_annotation == "as_given"
    with pytest.raises(SystemExit):
        parser.parse_args(["--annotation", "boxes"])
    data = CategoryData(tiny_dataset.root, tiny_dataset.category)
    variants = {variant.name: variant for variant in select_variants(("labels", "boxes-soft"))}
    datamodules = make_datamodules(plan_rows(settings, list(variants.values())), settings, data, seed=0)
    assert {name: datamodule.training_annotation for name, datamodule in datamodules.items()} == {
        PATCHCORE: "box", APC: "box", "APC labels": "label", "APC boxes-soft": "box",
    }
    assert variants["boxes-soft"].model_arguments == {"box_supervision": "soft"}
