"""anomalib's standard export of AnomalousPatchCore: ``anomalib export --model AnomalousPatchCore ...``.

The CLI is run in-process (``AnomalibCLI(args)``, what the ``anomalib`` console script calls), so the
short model name resolves through the plugin's import hook exactly as on the command line.
"""

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

from anomalib_apc.models import AnomalousPatchCore

IMAGE_SIZE = 64

@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, train_tiny_apc) -> tuple[AnomalousPatchCore, Path]:
    """A plain (not fine-tuned) model: the export path does not depend on the training phase."""
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, train_batch_size=8,
                         eval_batch_size=8, num_workers=0)
    run = train_tiny_apc(datamodule, image_size=IMAGE_SIZE, tasks=(), finetune_epochs=0)
    return run.model.eval(), run.checkpoint_path


def _anomalib_export(export_type: str, checkpoint: Path, export_root: Path) -> None:
    from anomalib.cli import AnomalibCLI

    # The CLI builds the model from its arguments before loading the checkpoint; pre_trained=false
    # keeps that throw-away instance from reaching for ImageNet weights.
    AnomalibCLI([
        "export", "--model", "AnomalousPatchCore", "--model.pre_trained", "false", "--export_type", export_type,
        "--ckpt_path", str(checkpoint), "--export_root", str(export_root),
    ])


def test_torch_export_through_anomalib_cli(checkpoint, tmp_path: Path) -> None:
    model, path = checkpoint
    _anomalib_export("torch", path, tmp_path)
    exported = torch.load(tmp_path / "weights" / "torch" / "model.pt", weights_only=False)["model"].eval()
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(images).pred_score, model(images).pred_score)


def test_openvino_export_through_anomalib_cli(checkpoint, tmp_path: Path) -> None:
    model, path = checkpoint
    _anomalib_export("openvino", path, tmp_path)
    compiled = ov.Core().compile_model(tmp_path / "weights" / "openvino" / "model.xml", "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images).pred_score.numpy()
    np.testing.assert_allclose(compiled(images.numpy())["pred_score"], expected, atol=1e-4)


def test_onnx_export_through_anomalib_cli(checkpoint, tmp_path: Path) -> None:
    _, path = checkpoint
    _anomalib_export("onnx", path, tmp_path)
    onnx_model = ov.Core().read_model(tmp_path / "weights" / "onnx" / "model.onnx")
    assert {output.get_any_name() for output in onnx_model.outputs} >= {"pred_score", "anomaly_map"}


def test_anomalib_openvino_export_takes_any_batch_size(tmp_path: Path) -> None:
    # At 192 px two images make 1,152 patches, more than the 1,024 that anomalib searches at a time.
    model = AnomalousPatchCore(
        backbone="resnet18", pre_trained=False, tasks=(), finetune_epochs=0, visualizer=False, post_processor=False,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(192, 192)),
    ).eval()
    model.model.memory_bank = torch.randn(300, 384, generator=torch.Generator().manual_seed(0))
    path = model.to_openvino(tmp_path, onnx_kwargs={"verbose": False})
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.input(0).get_partial_shape()[0].is_dynamic
    for batch_size in (1, 3):
        images = torch.rand(batch_size, 3, 192, 192, generator=torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            expected = model(images).pred_score.numpy()
        np.testing.assert_allclose(compiled(images.numpy())["pred_score"], expected, rtol=1e-4)
