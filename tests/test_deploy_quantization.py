"""INT8 bundles (nncf, with and without accuracy control), compact memory-bank indexes, and throughput prediction.

References: the PyTorch model (scores), the quantised graph itself run by hand (the recomputed memory
bank), exact search (recall and distances of the compact indexes), and sequential prediction
(the throughput mode's rows).
"""

import contextlib
import csv
import io
from pathlib import Path

import faiss
import numpy as np
import openvino as ov
import pytest
import torch

from anomalib_apc.cli import main as apc_main
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.deploy import ApcInferencer, export_bundle, predict_folder, read_metadata
from anomalib_apc.deploy.calibration import read_validation_images
from anomalib_apc.deploy.images import list_image_files, read_image_file
from anomalib_apc.deploy.metadata import GRAPH_FILE, GRAPH_OUTPUT, MEMORY_BANK_FILE
from anomalib_apc.deploy.options import APPROXIMATE_INDEX_TYPES
from anomalib_apc.deploy.search import BruteForceSearch, flat_vectors
from anomalib_apc.deploy.search_export import measure_recall, row_chunks
from anomalib_apc.errors import InvalidInputError, MissingInputError
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.normal_images import normal_training_images

pytestmark = pytest.mark.integration

IMAGE_SIZE = 64
# INT8 against the PyTorch model on the tiny model's test images: raw image scores within this
# fraction (measured: below 2 %), and the ranking of the images nearly kept.
INT8_SCORE_TOLERANCE = 0.05
INT8_MIN_RANK_CORRELATION = 0.9


@pytest.fixture(scope="module")
def datamodule(tiny_dataset) -> SupervisedMVTecAD:
    return SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                             train_batch_size=4, eval_batch_size=8, num_workers=0, seed=0)


@pytest.fixture(scope="module")
def model(datamodule, train_tiny_apc) -> AnomalousPatchCore:
    return train_tiny_apc(datamodule, image_size=IMAGE_SIZE).model.eval()


@pytest.fixture(scope="module")
def test_images(tiny_dataset) -> torch.Tensor:
    return torch.stack([read_image_file(path) for path in list_image_files([tiny_dataset.category_dir / "test"])])


@pytest.fixture(scope="module")
def int8_bundle(model, datamodule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(model, tmp_path_factory.mktemp("bundles") / "int8", precision="int8", datamodule=datamodule)


def _raw_scores(inferencer: ApcInferencer, images: torch.Tensor) -> torch.Tensor:
    return inferencer.score(inferencer.prepare(images).model_inputs).pred_score


def _shipped_memory_bank(bundle: Path) -> np.ndarray:
    index = faiss.read_index(str(bundle / MEMORY_BANK_FILE))
    return flat_vectors(index).copy()  # a copy: the view dies with the index


def _rank_correlation(first: torch.Tensor, second: torch.Tensor) -> float:
    ranks = torch.stack([first.argsort().argsort(), second.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def _assert_int8_scores_follow_the_model(bundle: Path, model: AnomalousPatchCore, images: torch.Tensor) -> None:
    inferencer = ApcInferencer(bundle)
    with torch.no_grad():
        reference = model.model(inferencer.prepare(images).model_inputs).pred_score
    scores = _raw_scores(inferencer, images)
    assert ((scores - reference).abs() / reference).max() < INT8_SCORE_TOLERANCE
    assert _rank_correlation(scores, reference) > INT8_MIN_RANK_CORRELATION


def test_int8_bundle_is_quantised_and_scores_like_the_model(
    int8_bundle: Path, model: AnomalousPatchCore, test_images: torch.Tensor,
) -> None:
    graph = ov.Core().read_model(int8_bundle / GRAPH_FILE)
    assert any(operation.get_type_name() == "FakeQuantize" for operation in graph.get_ops())
    assert read_metadata(int8_bundle).precision == "int8"
    _assert_int8_scores_follow_the_model(int8_bundle, model, test_images)


def test_int8_memory_bank_is_recomputed_by_the_quantised_graph(
    int8_bundle: Path, model: AnomalousPatchCore, datamodule,
) -> None:
    """Every shipped row is the quantised graph's row of a training patch, and none is the float model's row."""
    memory = read_metadata(int8_bundle).provenance["memory_bank"]
    float_bank = model.model.memory_bank.numpy()
    assert memory == {"source": "quantised graph", "rows_found": len(float_bank),
                      "mean_relative_change": pytest.approx(memory["mean_relative_change"])}
    assert memory["mean_relative_change"] > 0
    shipped = _shipped_memory_bank(int8_bundle)
    graph = ov.Core().compile_model(int8_bundle / GRAPH_FILE, "CPU")
    transform = model.pre_processor.transform
    datamodule.setup("fit")
    quantised_rows = np.concatenate([
        graph(transform(batch).numpy())[GRAPH_OUTPUT].reshape(-1, shipped.shape[1])
        for batch in normal_training_images(datamodule)
    ])
    index = faiss.IndexFlatL2(shipped.shape[1])
    index.add(quantised_rows)
    squared, _ = BruteForceSearch(index).nearest(shipped)
    assert (squared <= 1e-6 * np.square(shipped).sum(axis=1)).all()
    assert not np.allclose(shipped, float_bank, rtol=0, atol=1e-4)


def test_int8_recomputes_repeated_memory_bank_rows_too(model: AnomalousPatchCore, datamodule, tmp_path: Path) -> None:
    """A bank holding a row twice (flat background sampled twice): each calibration patch finds one of them."""
    original = model.model.memory_bank
    model.model.memory_bank = torch.cat([original, original[:5]])
    try:
        bundle = export_bundle(model, tmp_path / "repeated", precision="int8", datamodule=datamodule)
    finally:
        model.model.memory_bank = original
    memory = read_metadata(bundle).provenance["memory_bank"]
    assert (memory["source"], memory["rows_found"]) == ("quantised graph", len(original) + 5)
    shipped = _shipped_memory_bank(bundle)
    np.testing.assert_array_equal(shipped[-5:], shipped[:5])


def test_int8_ships_the_float_memory_bank_when_asked(int8_bundle: Path, model: AnomalousPatchCore, datamodule,
                                                     tmp_path: Path) -> None:
    bundle = export_bundle(model, tmp_path / "float_bank", precision="int8", datamodule=datamodule,
                           recompute_memory_bank=False)
    assert read_metadata(bundle).provenance["memory_bank"]["source"] == "float model"
    np.testing.assert_array_equal(_shipped_memory_bank(bundle), model.model.memory_bank.numpy())
    # the same quantised graph as the recomputed bundle's: only the memory bank differs
    assert (bundle / GRAPH_FILE.replace(".xml", ".bin")).read_bytes() == (
        int8_bundle / GRAPH_FILE.replace(".xml", ".bin")).read_bytes()


def test_int8_keeps_the_float_memory_bank_when_calibrated_on_other_images(
    model: AnomalousPatchCore, tiny_dataset, tmp_path: Path,
) -> None:
    bundle = export_bundle(model, tmp_path / "int8", precision="int8",
                           calibration_images=tiny_dataset.category_dir / "test" / "scratch")
    memory = read_metadata(bundle).provenance["memory_bank"]
    assert memory["source"] == "float model"
    assert memory["rows_found"] < len(model.model.memory_bank)
    np.testing.assert_array_equal(_shipped_memory_bank(bundle), model.model.memory_bank.numpy())


def test_int8_with_accuracy_control(
    model: AnomalousPatchCore, datamodule, tiny_dataset, test_images: torch.Tensor, tmp_path: Path,
) -> None:
    bundle = export_bundle(model, tmp_path / "acq", precision="int8-acq", datamodule=datamodule,
                           validation_images=tiny_dataset.category_dir / "test")
    assert read_metadata(bundle).precision == "int8-acq"
    assert read_metadata(bundle).provenance["memory_bank"]["source"] == "quantised graph"
    _assert_int8_scores_follow_the_model(bundle, model, test_images)


def test_int8_acq_needs_labelled_validation_images(model: AnomalousPatchCore, tiny_dataset, tmp_path: Path) -> None:
    calibration = tiny_dataset.category_dir / "train" / "good"
    with pytest.raises(InvalidInputError, match="int8-acq: accuracy control needs labelled validation images"):
        export_bundle(model, tmp_path / "a", precision="int8-acq", calibration_images=calibration)
    with pytest.raises(InvalidInputError, match=r"needs normal images in .*good.* found 0 normal and 5 defective"):
        export_bundle(model, tmp_path / "b", precision="int8-acq", calibration_images=calibration,
                      validation_images=tiny_dataset.category_dir / "test" / "scratch")
    with pytest.raises(MissingInputError, match=r"--validation-images .*missing: no such folder"):
        export_bundle(model, tmp_path / "c", precision="int8-acq", calibration_images=calibration,
                      validation_images=tmp_path / "missing")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_validation_images_are_labelled_by_folder(tiny_dataset) -> None:
    validation = read_validation_images(tiny_dataset.category_dir / "test", (IMAGE_SIZE, IMAGE_SIZE), lambda x: x)
    assert validation.labels.tolist().count(0) == tiny_dataset.test_normal
    assert validation.labels.tolist().count(1) == tiny_dataset.per_defect_type * len(tiny_dataset.defect_types)
    assert validation.model_inputs.shape == (len(validation.labels), 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("index_type", APPROXIMATE_INDEX_TYPES)
def test_compact_index_recall_size_and_scores(
    index_type: str, model: AnomalousPatchCore, datamodule, test_images: torch.Tensor, tmp_path: Path,
) -> None:
    """The recorded recall is what the shipped index gives; distances are exact or larger; scores follow."""
    bundle = export_bundle(model, tmp_path / index_type, index=index_type, datamodule=datamodule)
    search = read_metadata(bundle).approximate_search
    assert search["type"] == index_type
    assert search["bytes"] == (bundle / search["file"]).stat().st_size
    approximate, exact = ApcInferencer(bundle), ApcInferencer(bundle, search="brute_force")
    patches = approximate.embed(approximate.prepare(test_images).model_inputs)
    queries = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]))
    report = measure_recall(approximate.search, exact.search, row_chunks(queries), "test patches")
    assert report.recall_at_1 > 0.8, report
    assert report.max_relative_distance_error >= 0
    found, _ = approximate.search.nearest(queries)
    nearest, _ = exact.search.nearest(queries)
    assert (found >= nearest * (1 - 1e-5)).all()  # re-ranked against the exact rows: never below the exact distance
    exact_scores = _raw_scores(exact, test_images)
    difference = (_raw_scores(approximate, test_images) - exact_scores).abs() / exact_scores
    assert difference.max() <= 2 * report.max_relative_distance_error + 1e-5


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_recall_is_measured_on_validation_images_when_given(
    precision: str, model: AnomalousPatchCore, datamodule, tiny_dataset, test_images: torch.Tensor, tmp_path: Path,
) -> None:
    """Not on the memory bank's own images: the recorded figures are those of every validation patch, as the
    bundle's own graph computes them (INT8 queries for an INT8 bundle)."""
    validation = tiny_dataset.category_dir / "test"
    bundle = export_bundle(model, tmp_path / "hnsw", precision=precision, index="hnsw", datamodule=datamodule,
                           validation_images=validation)
    metadata = read_metadata(bundle)
    search = metadata.approximate_search
    assert search["recall_query_source"] == "validation image patches"
    assert metadata.exact_search is None or metadata.exact_search["measured_on"] == "validation image patches"
    approximate, exact = ApcInferencer(bundle), ApcInferencer(bundle, search="brute_force")
    # the test folder is the validation folder; fewer patches than the sample's limit, so all of them
    patches = approximate.embed(approximate.prepare(test_images).model_inputs)
    queries = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]))
    assert search["recall_queries"] == len(queries)
    reference = measure_recall(approximate.search, exact.search, row_chunks(queries), "validation patches")
    assert search["recall_at_1"] == pytest.approx(reference.recall_at_1, abs=2 / len(queries))
    assert search["max_relative_distance_error"] == pytest.approx(reference.max_relative_distance_error, abs=1e-3)
    assert search["mean_exact_distance"] == pytest.approx(reference.mean_exact_distance, rel=1e-4)


class _FixedAnswers:
    """A search that answers with given distances and ids, whatever the queries."""

    def __init__(self, squared_distances: list[float], ids: list[int]) -> None:
        self.answer = (np.array(squared_distances, dtype=np.float32)[:, None], np.array(ids)[:, None])

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.answer


def test_recall_report_by_hand() -> None:
    """A miss on a query that duplicates a bank row counts against recall, not in the relative error; an
    equally near row (another copy) counts as found."""
    exact = _FixedAnswers([1e-12, 4.0, 9.0, 16.0, 4.0], [0, 1, 2, 3, 7])
    approximate = _FixedAnswers([1.0, 4.0, 25.0, 16.0, 4.0], [5, 1, 6, 3, 8])
    report = measure_recall(approximate, exact, [np.zeros((5, 2))], "by hand")
    assert report.recall_at_1 == 3 / 5
    assert report.max_relative_distance_error == pytest.approx(5 / 3 - 1)  # distance 5 found for 3
    assert report.mean_relative_distance_error == pytest.approx((1 + 2 + 5 + 4 + 2) / (1e-6 + 2 + 3 + 4 + 2) - 1)
    assert report.mean_exact_distance == pytest.approx((1e-6 + 2 + 3 + 4 + 2) / 5)
    assert report.queries == 5


def test_hnsw_and_ivf_store_the_bank_in_fewer_bytes(model: AnomalousPatchCore, datamodule, tmp_path: Path) -> None:
    exact_bytes = model.model.memory_bank.numel() * 4
    for index_type in ("hnsw", "ivf"):
        bundle = export_bundle(model, tmp_path / index_type, index=index_type, datamodule=datamodule)
        # 8-bit codes: a quarter of the float rows, plus the graph's links or the lists' ids
        assert read_metadata(bundle).approximate_search["bytes"] < 0.6 * exact_bytes


def test_throughput_prediction_writes_the_rows_of_sequential_prediction(
    int8_bundle: Path, tiny_dataset, tmp_path: Path,
) -> None:
    inputs = tiny_dataset.category_dir / "test"
    broken = tmp_path / "inputs" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    sequential = predict_folder(int8_bundle, [inputs, broken], tmp_path / "sequential", batch_size=3,
                                show_progress=False)
    pipelined = predict_folder(int8_bundle, [inputs, broken], tmp_path / "pipelined", batch_size=3,
                               show_progress=False, throughput=True)
    assert (pipelined.images, pipelined.scored) == (sequential.images, sequential.scored) == (20, 19)
    assert pipelined.images_per_second > 0

    def rows(output: Path) -> list[tuple[str, ...]]:
        with (output / "scores.csv").open() as scores:
            return [(row["path"], row["status"][:40], row["score"], row["label"]) for row in csv.DictReader(scores)]

    assert rows(tmp_path / "pipelined") == rows(tmp_path / "sequential")


def test_predict_command_takes_ov_config_and_throughput(int8_bundle: Path, tiny_dataset, tmp_path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as output:
        status = apc_main(["predict", "--bundle", str(int8_bundle), "--output", str(tmp_path / "out"),
                           "--throughput", "--ov-config", "NUM_STREAMS=2", "INFERENCE_NUM_THREADS=1", "--",
                           str(tiny_dataset.category_dir / "test" / "good")])
    assert status == 0
    assert "images/s" in output.getvalue()
    inferencer = ApcInferencer(int8_bundle, num_threads=2, ov_config={"NUM_STREAMS": "2"})
    assert int(inferencer.graph.get_property("NUM_STREAMS")) == 2
    with contextlib.redirect_stderr(io.StringIO()) as errors:
        status = apc_main(["predict", "--bundle", str(int8_bundle), "--output", str(tmp_path / "bad"), "--ov-config",
                           "NUM_STREAMS", "--", str(tiny_dataset.category_dir / "test" / "good")])
    assert status != 0
    assert "--ov-config: expected KEY=VALUE (e.g. PERFORMANCE_HINT=THROUGHPUT), got 'NUM_STREAMS'" in errors.getvalue()
    assert not (tmp_path / "bad").exists()
