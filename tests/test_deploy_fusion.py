"""Bundles of models with ``segmentation_fusion``: one graph with two outputs, and parity with the PyTorch model.

The reference is the PyTorch model itself, with and without the fusion, on the same images.
"""

from pathlib import Path

import openvino as ov
import pytest
import torch

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.deploy import ApcInferencer, compare_with_model, export_bundle, read_metadata
from anomalib_apc.deploy.images import list_image_files, read_image_file
from anomalib_apc.deploy.metadata import DEFECT_PROBABILITY_OUTPUT, GRAPH_FILE, GRAPH_OUTPUT
from anomalib_apc.models import AnomalousPatchCore

SCORE_TOLERANCE = 1e-3  # as tests/test_deploy.py: FP32 bundle against the PyTorch model
ANOMALY_MAP_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def fused_model(tiny_dataset, train_tiny_apc) -> AnomalousPatchCore:
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                                   train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0)
    return train_tiny_apc(datamodule, segmentation_fusion=1.0).model.eval()


@pytest.fixture(scope="module")
def fused_bundle(fused_model: AnomalousPatchCore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(fused_model, tmp_path_factory.mktemp("bundles") / "fused")


@pytest.fixture(scope="module")
def test_images(tiny_dataset) -> torch.Tensor:
    return torch.stack([read_image_file(path) for path in list_image_files([tiny_dataset.category_dir / "test"])])


def test_fused_bundle_has_one_graph_with_two_outputs_and_matches_the_model(
    fused_model: AnomalousPatchCore, fused_bundle: Path, test_images: torch.Tensor
) -> None:
    metadata = read_metadata(fused_bundle)
    assert metadata.segmentation_fusion == 1.0
    assert sorted(path.name for path in fused_bundle.glob("*.xml")) == [GRAPH_FILE]
    graph = ov.Core().read_model(fused_bundle / GRAPH_FILE)
    assert [output.get_any_name() for output in graph.outputs] == [GRAPH_OUTPUT, DEFECT_PROBABILITY_OUTPUT]
    report = compare_with_model(ApcInferencer(fused_bundle), fused_model, test_images)
    assert report.max_relative_score_difference < SCORE_TOLERANCE
    assert report.max_relative_anomaly_map_difference < ANOMALY_MAP_TOLERANCE


def test_fused_bundle_maps_differ_from_patchcores_by_the_defect_probability(
    fused_model: AnomalousPatchCore, fused_bundle: Path, test_images: torch.Tensor
) -> None:
    inferencer = ApcInferencer(fused_bundle)
    model_inputs = inferencer.prepare(test_images).model_inputs
    fused = inferencer.score(model_inputs)
    inferencer.fuse_defect_probability = False  # the same bundle without the fusion: PatchCore's map
    plain = inferencer.score(model_inputs)
    with torch.no_grad():
        probability = fused_model.model.defect_probability(model_inputs, model_inputs.shape[-2:])
    torch.testing.assert_close(fused.pred_score, plain.pred_score, rtol=0, atol=0)
    peak = plain.anomaly_map.abs().max()
    torch.testing.assert_close(fused.anomaly_map / peak, plain.anomaly_map * probability / peak,
                               atol=ANOMALY_MAP_TOLERANCE, rtol=0)
    assert (fused.anomaly_map - plain.anomaly_map).abs().max() > 10 * ANOMALY_MAP_TOLERANCE * peak


def test_bundle_without_fusion_has_a_graph_of_one_output(fused_model: AnomalousPatchCore, tmp_path: Path) -> None:
    fused_model.model.segmentation_fusion = 0.0
    try:
        bundle = export_bundle(fused_model, tmp_path / "plain")
    finally:
        fused_model.model.segmentation_fusion = 1.0
    assert read_metadata(bundle).segmentation_fusion == 0.0
    assert len(ov.Core().read_model(bundle / GRAPH_FILE).outputs) == 1
    assert not ApcInferencer(bundle).fuse_defect_probability


def test_one_encoder_pass_gives_the_embedding_map_and_the_defect_probability(
    fused_model: AnomalousPatchCore, test_images: torch.Tensor,
) -> None:
    """The fused graph's module against the model's two separate methods, on the same inputs."""
    model_inputs = fused_model.pre_processor.transform(test_images)
    with torch.no_grad():
        embedding, probability = fused_model.model.embedding_map_and_defect_probability(
            model_inputs, model_inputs.shape[-2:])
        torch.testing.assert_close(embedding, fused_model.model.embedding_map(model_inputs))
        torch.testing.assert_close(probability,
                                   fused_model.model.defect_probability(model_inputs, model_inputs.shape[-2:]))
