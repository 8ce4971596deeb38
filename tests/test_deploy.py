"""Deployment: bundle export, ApcInferencer parity with the PyTorch model, search, bad input, CLI.

One tiny model (ResNet-18, 64 px, one fine-tuning epoch) is trained through anomalib's Engine once
for the module and exported once; tests that break a bundle work on a copy.
"""

import contextlib
import csv
import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from PIL import Image

from anomalib_apc.cli import main as apc_main
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.deploy import ApcInferencer, ImageReadError, compare_with_model, export_bundle, read_metadata
from anomalib_apc.deploy.images import list_image_files, read_image_file
from anomalib_apc.deploy.metadata import sealed
from anomalib_apc.deploy.options import APPROXIMATE_INDEX_TYPES
from anomalib_apc.deploy.search import BoundedExactSearch, BoundProjection, BruteForceSearch
from anomalib_apc.deploy.search_export import approximate_index_recipe, held_out_recall, held_out_split, measure_bound
from anomalib_apc.models import AnomalousPatchCore

IMAGE_SIZE = 64
# Stated parity tolerances of an FP32 bundle with exact search against the PyTorch model.
SCORE_TOLERANCE = 1e-3  # relative, raw image scores
ANOMALY_MAP_TOLERANCE = 1e-3  # absolute difference over the map's peak, raw anomaly maps


@pytest.fixture(scope="module")
def trained(tiny_dataset, train_tiny_apc) -> tuple[AnomalousPatchCore, Path]:
    """A fine-tuned, validated model and its Lightning checkpoint."""
    datamodule = SupervisedMVTecAD(
        root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3, train_batch_size=4,
        eval_batch_size=8, num_workers=0, seed=0,
    )
    run = train_tiny_apc(datamodule, image_size=IMAGE_SIZE)
    return run.model.eval(), run.checkpoint_path


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """The FP32 bundle with exact search, exported from the checkpoint by the command line, its status and output."""
    _, checkpoint = trained
    bundle = tmp_path_factory.mktemp("bundles") / "fp32"
    with contextlib.redirect_stdout(io.StringIO()) as output:
        status = apc_main(["export-bundle", "--ckpt", str(checkpoint), "--output", str(bundle)])
    return bundle, status, output.getvalue()


@pytest.fixture(scope="module")
def bundle(exported: tuple[Path, int, str]) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def inferencer(bundle: Path) -> ApcInferencer:
    return ApcInferencer(bundle)


@pytest.fixture(scope="module")
def test_images(tiny_dataset) -> torch.Tensor:
    files = list_image_files([tiny_dataset.category_dir / "test"])
    return torch.stack([read_image_file(path) for path in files])


@pytest.fixture
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_bundle_holds_graph_indexes_and_metadata(bundle: Path, trained) -> None:
    model, checkpoint = trained
    metadata = read_metadata(bundle)
    assert {path.name for path in bundle.iterdir()} == {"metadata.json", *metadata.files()}
    provenance = metadata.provenance
    assert provenance["backbone"] == "resnet18"
    assert provenance["layers"] == ["layer2", "layer3"]
    assert metadata.num_neighbors == 9
    assert metadata.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert metadata.feature_map_size == (IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    assert metadata.embedding_dim == 128 + 256
    assert metadata.memory_bank_size == model.model.memory_bank.shape[0]
    assert provenance["source_checkpoint"]["path"] == str(checkpoint)
    assert provenance["source_checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert provenance["source_checkpoint"]["global_step"] > 0
    assert set(metadata.checksums) == set(metadata.files())
    memory_bank_digest = hashlib.sha256((bundle / "memory_bank.faiss").read_bytes()).hexdigest()
    assert metadata.checksums["memory_bank.faiss"] == memory_bank_digest
    assert set(provenance["versions"]) == {"anomalib_apc", "anomalib", "openvino", "faiss", "torch"}
    state = metadata.post_processor["state"]
    assert state["_image_threshold"] == pytest.approx(float(model.post_processor.image_threshold))
    assert state["image_max"] == pytest.approx(float(model.post_processor.image_max))
    if metadata.exact_search is not None:  # kept only where it was faster than brute force at export
        assert metadata.exact_search["dim"] == metadata.embedding_dim // 6
        assert metadata.exact_search["measured_speedup_vs_brute_force"] > 1
    assert metadata.approximate_search is None
    assert provenance["verification"]["labels_equal"] is True
    index = faiss.read_index(str(bundle / "memory_bank.faiss"))
    assert isinstance(index, faiss.IndexFlatL2)
    np.testing.assert_array_equal(faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d),
                                  model.model.memory_bank.numpy().ravel())


def test_fp32_bundle_matches_the_torch_model(inferencer: ApcInferencer, trained, test_images: torch.Tensor) -> None:
    model, _ = trained
    report = compare_with_model(inferencer, model, test_images)
    assert report.images == len(test_images)
    assert report.max_relative_score_difference < SCORE_TOLERANCE
    assert report.max_relative_anomaly_map_difference < ANOMALY_MAP_TOLERANCE
    assert report.labels_equal is True

    # The user-facing results equal the Lightning module's (pre-processor, model, post-processor).
    result = inferencer.predict(test_images)
    with torch.no_grad():
        expected = model(test_images)
    assert isinstance(result, ImageBatch)
    assert torch.equal(result.pred_label, expected.pred_label)
    # Normalised scores divide the raw ones' (parity-checked above) differences by the spread of the
    # normal scores, which is narrow on the subtle demo defects: 1e-3 on a [0, 1] scale, as for raw scores.
    torch.testing.assert_close(result.pred_score, expected.pred_score, atol=SCORE_TOLERANCE, rtol=0)
    torch.testing.assert_close(result.anomaly_map, expected.anomaly_map.squeeze(1), atol=ANOMALY_MAP_TOLERANCE, rtol=0)
    assert result.pred_mask.shape == (len(test_images), IMAGE_SIZE, IMAGE_SIZE)
    assert 0 < int(result.pred_label.sum()) < len(test_images)


def test_ov_config_reaches_the_compiled_graph_and_overrides_the_defaults(
    bundle: Path, inferencer: ApcInferencer, test_images: torch.Tensor
) -> None:
    assert str(inferencer.graph.get_property("PERFORMANCE_HINT")) == "LATENCY"
    tuned = ApcInferencer(bundle, ov_config={"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 1})
    assert str(tuned.graph.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert tuned.graph.get_property("INFERENCE_NUM_THREADS") == 1
    torch.testing.assert_close(
        tuned.predict(test_images).pred_score, inferencer.predict(test_images).pred_score, rtol=1e-5, atol=1e-5
    )


def test_any_batch_size_gives_the_same_scores(inferencer: ApcInferencer, test_images: torch.Tensor) -> None:
    together = inferencer.predict(test_images[:3]).pred_score
    alone = torch.cat([inferencer.predict(image).pred_score for image in test_images[:3]])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_prediction_from_files_keeps_paths_and_matches_tensors(inferencer: ApcInferencer, tiny_dataset) -> None:
    files = list_image_files([tiny_dataset.category_dir / "test"])[:2]
    from_files = inferencer.predict(files)
    assert from_files.image_path == [str(path) for path in files]
    from_tensors = inferencer.predict(torch.stack([read_image_file(path) for path in files]))
    torch.testing.assert_close(from_files.pred_score, from_tensors.pred_score)


def test_pre_processor_is_rebuilt_from_the_metadata(inferencer: ApcInferencer, trained) -> None:
    model, _ = trained
    image = torch.rand(1, 3, 90, 70, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(inferencer.pre_processor.transform(image), model.pre_processor.transform(image))


def test_bounded_exact_search_equals_brute_force_on_bundle_patches(inferencer: ApcInferencer,
                                                                   test_images: torch.Tensor) -> None:
    patches = inferencer.embed(inferencer.prepare(test_images).model_inputs)
    rows = patches.reshape(-1, patches.shape[-1])
    vectors = inferencer.scoring.memory_bank.numpy()
    bounded = BoundedExactSearch(inferencer.memory_bank, BoundProjection.fit(vectors, max_dim=16), candidates=8)
    exact_distances, exact_ids = BruteForceSearch(inferencer.memory_bank).nearest(rows)
    distances, ids = bounded.nearest(rows)
    assert 0 < bounded.settled_fraction
    np.testing.assert_allclose(distances, exact_distances, rtol=1e-5)
    assert (ids == exact_ids).mean() > 0.99  # rows at the same distance may swap under float rounding


def _low_rank_rows(noise: float) -> tuple[faiss.IndexFlatL2, np.ndarray, np.ndarray]:
    """A 500-row bank and 300 queries: rank-4 rows of 32 features plus Gaussian noise."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((4, 32)).astype(np.float32)
    bank = (rng.standard_normal((500, 4)) @ basis + noise * rng.standard_normal((500, 32))).astype(np.float32)
    queries = (rng.standard_normal((300, 4)) @ basis + noise * rng.standard_normal((300, 32))).astype(np.float32)
    index = faiss.IndexFlatL2(32)
    index.add(bank)
    return index, bank, queries


def _assert_exact(search: BoundedExactSearch, bank: np.ndarray, queries: np.ndarray) -> None:
    distances, ids = search.nearest(queries)
    exact = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, exact.argmin(1))
    np.testing.assert_allclose(distances, exact.min(1), rtol=1e-5)


def test_bounded_search_falls_back_to_brute_force_where_the_bound_is_loose() -> None:
    # Noisy low-rank rows: a 4-axis bound settles some queries even with the wider round, not all.
    index, bank, queries = _low_rank_rows(noise=1.0)
    search = BoundedExactSearch(index, BoundProjection.fit(bank, max_dim=4), candidates=4)
    _assert_exact(search, bank, queries)
    assert 0 < search.settled_fraction < 1
    np.testing.assert_array_equal(BruteForceSearch(index).nearest(queries)[1], search.nearest(queries)[1])


def test_a_wider_second_round_settles_what_the_first_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    index, bank, queries = _low_rank_rows(noise=0.5)
    search = BoundedExactSearch(index, BoundProjection.fit(bank, max_dim=4), candidates=4)
    _assert_exact(search, bank, queries)
    assert search.settled_fraction == 1.0
    monkeypatch.setattr("anomalib_apc.deploy.search.WIDER_ROUND_FACTOR", 1)  # the first round alone
    _assert_exact(search, bank, queries)
    assert search.settled_fraction < 0.5


def test_approximate_index_records_its_recall(trained, tmp_path: Path, tiny_dataset, test_images) -> None:
    model, _ = trained
    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=3,
                                   eval_batch_size=8, num_workers=0, seed=0)
    path = export_bundle(model, tmp_path / "hnsw", index="hnsw", datamodule=datamodule)
    metadata = read_metadata(path)
    assert metadata.provenance["verification"]["source"] == "calibration images"
    assert metadata.exact_search is None or metadata.exact_search["measured_on"].startswith("calibration image patches")
    search = metadata.approximate_search
    assert search["type"] == "hnsw"
    assert 0.5 <= search["recall_at_1"] <= 1
    assert search["mean_relative_distance_error"] >= -1e-4
    assert search["recall_query_source"].startswith("calibration image patches")
    approximate, exact = ApcInferencer(path), ApcInferencer(path, search="exact")
    assert not isinstance(approximate.search, BoundedExactSearch)
    assert isinstance(exact.search, BoundedExactSearch | BruteForceSearch)
    # Exact re-ranking of the candidates: an approximate patch score is never below the exact one.
    assert (approximate.score(approximate.prepare(test_images).model_inputs).pred_score + 1e-5
            >= exact.score(exact.prepare(test_images).model_inputs).pred_score).all()


def test_bound_settles_low_rank_features_and_not_structureless_ones() -> None:
    rng = np.random.default_rng(0)
    low_rank = (rng.standard_normal((2000, 6)) @ rng.standard_normal((6, 96))).astype(np.float32)
    low_rank += 0.01 * rng.standard_normal(low_rank.shape).astype(np.float32)
    structureless = rng.standard_normal((2000, 96)).astype(np.float32)
    settled = {}
    for name, rows in (("low rank", low_rank), ("structureless", structureless)):
        queries, rest = held_out_split(rows)
        index = faiss.IndexFlatL2(rows.shape[1])
        index.add(rest)
        measurement = measure_bound(index, BoundProjection.fit(rest, max_dim=16), queries, "held out", candidates=16)
        assert measurement.queries == len(queries) == 200
        assert measurement.bounded_seconds > 0 and measurement.brute_force_seconds > 0
        settled[name] = measurement.settled_fraction
    assert settled["low rank"] > 0.95
    assert settled["structureless"] < 0.05


@pytest.mark.parametrize("index_type", APPROXIMATE_INDEX_TYPES)
def test_held_out_recall_without_images(trained, index_type: str) -> None:
    model, _ = trained
    bank = model.model.memory_bank.numpy()
    report = held_out_recall(bank, approximate_index_recipe(index_type, *bank.shape))
    assert report.queries == len(bank) // 10
    assert 0.5 <= report.recall_at_1 <= 1
    assert "held out" in report.query_source


def test_fp16_and_int8_bundles(trained, bundle: Path, tmp_path: Path, tiny_dataset, test_images: torch.Tensor) -> None:
    model, _ = trained
    calibration = tiny_dataset.category_dir / "train" / "good"
    fp16 = export_bundle(model, tmp_path / "fp16", precision="fp16")
    int8 = export_bundle(model, tmp_path / "int8", precision="int8", calibration_images=calibration,
                         max_calibration_images=8)
    assert (fp16 / "embedding.bin").stat().st_size < 0.8 * (bundle / "embedding.bin").stat().st_size
    metadata = read_metadata(int8)
    assert metadata.precision == "int8"
    assert "nncf" in metadata.provenance["versions"]
    assert metadata.provenance["verification"]["source"] == "calibration images"
    assert read_metadata(fp16).provenance["verification"]["max_relative_score_difference"] < 1e-2
    int8_scores = ApcInferencer(int8).predict(test_images).pred_score
    assert torch.isfinite(int8_scores).all()


def test_int8_needs_calibration_images(trained, tmp_path: Path) -> None:
    model, _ = trained
    with pytest.raises(ValueError, match="calibration images"):
        export_bundle(model, tmp_path / "int8", precision="int8")


def test_unfitted_model_and_missing_checkpoint_are_refused(tmp_path: Path) -> None:
    unfitted = AnomalousPatchCore(backbone="resnet18", pre_trained=False, finetune_epochs=0)
    with pytest.raises(ValueError, match="empty memory bank"):
        export_bundle(unfitted, tmp_path / "bundle")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_bundle(tmp_path / "missing.ckpt", tmp_path / "bundle")


def test_existing_output_is_not_overwritten_silently(trained, bundle: Path) -> None:
    model, _ = trained
    with pytest.raises(FileExistsError, match="not empty"):
        export_bundle(model, bundle)


def _edit_metadata(bundle: Path, **changes: object) -> None:
    """Change fields and seal the file again, as an exporter would: the checks behind the seal are under test."""
    path = bundle / "metadata.json"
    path.write_text(json.dumps(sealed(json.loads(path.read_text()) | changes)))


def test_bundle_of_another_format_version_is_refused(bundle_copy: Path) -> None:
    _edit_metadata(bundle_copy, format_version=99)
    with pytest.raises(ValueError, match="format version 99"):
        ApcInferencer(bundle_copy)


def test_bundle_of_another_architecture_is_refused(bundle_copy: Path) -> None:
    _edit_metadata(bundle_copy, architecture="Patchcore")
    with pytest.raises(ValueError, match="architecture 'Patchcore'"):
        ApcInferencer(bundle_copy)


def test_bundle_with_a_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "memory_bank.faiss").unlink()
    with pytest.raises(FileNotFoundError, match=r"memory_bank\.faiss"):
        ApcInferencer(bundle_copy)
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        ApcInferencer(bundle_copy.parent)


def test_bundle_whose_files_disagree_with_the_metadata_is_refused(bundle_copy: Path) -> None:
    _edit_metadata(bundle_copy, memory_bank_size=read_metadata(bundle_copy).memory_bank_size + 1)
    with pytest.raises(ValueError, match=r"memory_bank\.faiss: .* rows"):
        ApcInferencer(bundle_copy)
    _edit_metadata(bundle_copy, memory_bank_size=read_metadata(bundle_copy).memory_bank_size - 1, embedding_dim=99)
    with pytest.raises(ValueError, match=r"embedding\.xml: graph maps"):
        ApcInferencer(bundle_copy)


def _write(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_grayscale_image_is_converted_with_a_note(inferencer, tiny_dataset, tmp_path, caplog) -> None:
    rgb_path = list_image_files([tiny_dataset.category_dir / "test"])[0]
    gray = Image.open(rgb_path).convert("L")
    gray_path = _write(gray, tmp_path / "gray.png")
    with caplog.at_level(logging.INFO, logger="anomalib_apc.deploy"):
        result = inferencer.predict(gray_path)
    assert "gray.png: grayscale (L) image, converted to RGB" in caplog.text
    expected = inferencer.predict(_write(gray.convert("RGB"), tmp_path / "gray_as_rgb.png"))
    torch.testing.assert_close(result.pred_score, expected.pred_score)


def test_alpha_channel_is_dropped_with_a_warning(inferencer, tiny_dataset, tmp_path, caplog) -> None:
    rgb_path = list_image_files([tiny_dataset.category_dir / "test"])[0]
    rgba_path = _write(Image.open(rgb_path).convert("RGBA"), tmp_path / "rgba.png")
    with caplog.at_level(logging.WARNING, logger="anomalib_apc.deploy"):
        result = inferencer.predict(rgba_path)
    assert "rgba.png: RGBA image; its alpha channel is dropped" in caplog.text
    torch.testing.assert_close(result.pred_score, inferencer.predict(rgb_path).pred_score)
    array = np.asarray(Image.open(rgba_path))
    torch.testing.assert_close(inferencer.predict(array).pred_score, result.pred_score)


def test_image_of_another_size_is_resized_with_a_note(inferencer: ApcInferencer, caplog) -> None:
    image = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="anomalib_apc.deploy"):
        result = inferencer.predict(image)
    assert "Images of 80x100 pixels are resized to the model's 64x64 input" in caplog.text
    assert result.anomaly_map.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert result.image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_unreadable_images_raise_errors_naming_them(inferencer: ApcInferencer, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageReadError, match=r"corrupt\.png: cannot read this file as an image"):
        inferencer.predict(corrupt)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        inferencer.predict(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="1 \\(gray\\), 3 \\(RGB\\) or 4 \\(RGBA\\) channels, got 2"):
        inferencer.predict(torch.rand(2, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ImageReadError, match="must lie in \\[0, 1\\]"):
        inferencer.predict(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255.0, dtype=np.float32))


def test_cli_exports_and_predicts_with_overlays_and_scores(exported, trained, tiny_dataset, tmp_path: Path,
                                                          capsys) -> None:
    bundle, status, output = exported
    assert status == 0
    assert f"Bundle written to {bundle}: resnet18 fp32" in output
    _, checkpoint = trained
    assert apc_main(["export-bundle", "--ckpt", str(checkpoint), "--output", str(bundle)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    test_dir = tiny_dataset.category_dir / "test"
    corrupt = tmp_path / "inputs" / "corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not an image")
    predictions = tmp_path / "predictions"
    status = apc_main(["predict", "--bundle", str(bundle), "--output", str(predictions), "--batch-size", "4",
                       str(test_dir), str(corrupt)])
    assert status == 1
    assert "corrupt.png: cannot read this file as an image" in capsys.readouterr().err
    with (predictions / "scores.csv").open() as scores_file:
        rows = list(csv.DictReader(scores_file))
    images = list_image_files([test_dir])
    assert [row["path"] for row in rows] == [*map(str, images), str(corrupt)]
    *rows, corrupt_row = rows
    assert corrupt_row["status"].startswith(f"{corrupt}: cannot read this file as an image")
    assert corrupt_row["score"] == corrupt_row["label"] == ""
    assert {row["status"] for row in rows} == {"ok"}
    assert {row["label"] for row in rows} <= {"normal", "anomalous"}
    expected = ApcInferencer(bundle).predict(images).pred_score
    np.testing.assert_allclose([float(row["score"]) for row in rows], expected.numpy(), atol=1e-5)
    overlays = sorted((predictions / "overlays").rglob("*.png"))
    assert len(overlays) == len(images)
    assert Image.open(overlays[0]).size[1] == 256  # anomalib's visualizer: image | anomaly map | mask
