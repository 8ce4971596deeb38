"""``anomalib-apc export-bundle`` and ``anomalib-apc predict``: argument parsing and console output only.

The work is done by ``export_bundle`` (``bundle.py``) and ``predict_folder`` (``predict.py``), which
Python callers use directly.
"""

import argparse
import sys
from pathlib import Path

from anomalib_apc.errors import InvalidInputError

from .options import INDEX_TYPES, OVERLAY_DIR, PRECISIONS, SCORES_FILE, SEARCH_MODES


def add_export_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint of a trained AnomalousPatchCore")
    parser.add_argument("--output", required=True, type=Path, help="bundle folder to create")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="graph weights: fp32 (parity with PyTorch), fp16, int8 (needs --calibration-images) or "
                             "int8-acq (accuracy-controlled; also needs --validation-images)")
    parser.add_argument("--index", choices=INDEX_TYPES, default="flat",
                        help="flat: exact search only; hnsw/ivf/pca: also a compact approximate index re-ranked "
                             "against the exact rows, used by default")
    parser.add_argument("--calibration-images", type=Path,
                        help="folder of (normal) images for INT8 calibration and the parity check")
    parser.add_argument("--max-calibration-images", type=int, default=300, help="read at most this many (default 300)")
    parser.add_argument("--validation-images", type=Path,
                        help="folder with good/ (normal) and defect subfolders, as an MVTec test folder: int8-acq's "
                             "accuracy control, and the images the search's recall is measured on")
    parser.add_argument("--max-drop", type=float, default=0.005,
                        help="for int8-acq: largest loss of validation image AUROC, 0..1 (default 0.005)")
    parser.add_argument("--keep-float-memory-bank", action="store_true",
                        help="INT8: ship the float model's memory bank instead of recomputing it with the INT8 graph")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --output")


def run_export_bundle(args: argparse.Namespace) -> int:
    """Export the checkpoint and print what the bundle holds and how it was verified."""
    from .bundle import export_bundle
    from .metadata import read_metadata

    directory = export_bundle(
        args.ckpt,
        args.output,
        precision=args.precision,
        index=args.index,
        calibration_images=args.calibration_images,
        max_calibration_images=args.max_calibration_images,
        validation_images=args.validation_images,
        max_drop=args.max_drop,
        recompute_memory_bank=not args.keep_float_memory_bank,
        overwrite=args.overwrite,
    )
    metadata = read_metadata(directory)
    print(f"Bundle written to {directory}: {metadata.provenance['backbone']} {metadata.precision}, "
          f"input {metadata.image_size}, memory bank {metadata.memory_bank_size} x {metadata.embedding_dim}.")
    memory_bank = metadata.provenance["memory_bank"]
    if metadata.precision.startswith("int8"):
        print(f"Memory bank from the {memory_bank['source']} ({memory_bank['rows_found']} of "
              f"{metadata.memory_bank_size} rows found among the calibration patches).")
    if metadata.approximate_search:
        search = metadata.approximate_search
        print(f"{search['type']} index ({search['bytes'] / 2**20:.1f} MiB): recall@1 {search['recall_at_1']:.4f} "
              f"against exact search, nearest distances {search['max_relative_distance_error']:.2e} larger at most "
              f"({search['recall_queries']} queries: {search['recall_query_source']}).")
    if metadata.provenance["verification"]:
        check = metadata.provenance["verification"]
        print(f"Parity with the PyTorch model on {check['images']} {check['source']}: scores within "
              f"{check['max_relative_score_difference']:.2e} relative, labels equal: {check['labels_equal']}.")
    return 0


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="bundle folder written by export-bundle")
    parser.add_argument("--output", required=True, type=Path, help=f"folder for {SCORES_FILE} and {OVERLAY_DIR}/")
    parser.add_argument("paths", nargs="+", type=Path, help="image files, or folders searched recursively for images")
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference call (default 8)")
    parser.add_argument("--search", choices=SEARCH_MODES, default="default",
                        help="default: the bundle's approximate index if any, else exact; exact; brute_force")
    parser.add_argument("--threads", type=int, help="CPU threads for OpenVINO and faiss (default: all available)")
    parser.add_argument("--throughput", action="store_true",
                        help="run the CNN of the next batches while one is searched (OpenVINO AsyncInferQueue)")
    parser.add_argument("--ov-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="OpenVINO properties of the graph, e.g. PERFORMANCE_HINT=THROUGHPUT NUM_STREAMS=1")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace the {SCORES_FILE} and {OVERLAY_DIR}/ of an earlier run in --output")


def run_predict(args: argparse.Namespace) -> int:
    """Score every image; a file that cannot be read or scored gets its error in its row and makes the exit status 1."""
    from .predict import predict_folder

    summary = predict_folder(
        args.bundle,
        args.paths,
        args.output,
        batch_size=args.batch_size,
        search=args.search,
        num_threads=args.threads,
        overwrite=args.overwrite,
        throughput=args.throughput,
        ov_config=ov_properties(args.ov_config),
    )
    failed = len(summary.failures)
    print(f"Scored {summary.scored} of {summary.images} images, {failed} failed, {summary.images_per_second:.1f} "
          f"images/s: {summary.scores_file}, overlays in {summary.overlay_dir}.")
    if summary.failures:
        print(f"anomalib-apc predict: {failed} of {summary.images} file(s) could not be scored (their rows in "
              f"{summary.scores_file.name} say why):\n  " + "\n  ".join(summary.failures), file=sys.stderr)
        return 1
    return 0


def ov_properties(pairs: list[str]) -> dict[str, str]:
    """``--ov-config KEY=VALUE ...`` as a dict; OpenVINO converts each value from its text itself.

    Raises:
        InvalidInputError: An item is not ``KEY=VALUE``.
    """
    properties = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip() or not value.strip():
            msg = f"--ov-config: expected KEY=VALUE (e.g. PERFORMANCE_HINT=THROUGHPUT), got {pair!r}."
            raise InvalidInputError(msg)
        properties[key.strip()] = value.strip()
    return properties
