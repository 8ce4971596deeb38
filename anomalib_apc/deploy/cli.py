"""``anomalib-apc export-bundle`` and ``anomalib-apc predict``: argument parsing and console output only."""

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from .options import INDEX_TYPES, PRECISIONS, SEARCH_MODES

SCORES_FILE = "scores.csv"
OVERLAY_DIR = "overlays"


def add_export_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint of a trained AnomalousPatchCore")
    parser.add_argument("--output", required=True, type=Path, help="bundle folder to create")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="graph weights: fp32 (parity with PyTorch), fp16, or int8 (needs --calibration-images)")
    parser.add_argument("--index", choices=INDEX_TYPES, default="flat",
                        help="flat: exact search only; hnsw/ivf: also an approximate index, used by default at inference")
    parser.add_argument("--calibration-images", type=Path,
                        help="folder of (normal) images for INT8 calibration, recall measurement and the parity check")
    parser.add_argument("--max-calibration-images", type=int, default=300, help="read at most this many (default 300)")
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
        overwrite=args.overwrite,
    )
    metadata = read_metadata(directory)
    print(f"Bundle written to {directory}: {metadata.backbone} {metadata.precision}, input {metadata.image_size}, "
          f"memory bank {metadata.memory_bank_size} x {metadata.embedding_dim}.")
    if metadata.approximate_search:
        search = metadata.approximate_search
        print(f"{search['type']} index: recall@1 {search['recall_at_1']:.4f} against exact search "
              f"({search['recall_queries']} queries: {search['recall_query_source']}).")
    if metadata.verification:
        check = metadata.verification
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


def run_predict(args: argparse.Namespace) -> int:
    """Score every image; unreadable files are reported and skipped, and make the exit status 1."""
    from anomalib.visualization import ImageVisualizer
    from tqdm import tqdm

    from .images import ImageReadError, list_image_files, read_image_file
    from .inferencer import ApcInferencer

    if args.batch_size < 1:
        msg = f"--batch-size must be at least 1, got {args.batch_size}."
        raise ValueError(msg)
    files = list_image_files(args.paths)
    inferencer = ApcInferencer(args.bundle, num_threads=args.threads, search=args.search)
    overlay_root = args.output / OVERLAY_DIR
    overlay_root.mkdir(parents=True, exist_ok=True)
    common_parent = _common_parent(files)
    visualizer = ImageVisualizer()
    failures: list[str] = []
    with (args.output / SCORES_FILE).open("w", newline="") as scores_file, \
            tqdm(total=len(files), desc="Scoring images", unit="image") as progress:
        scores = csv.writer(scores_file)
        scores.writerow(["path", "score", "label"])
        for start in range(0, len(files), args.batch_size):
            readable, images = [], []
            for path in files[start:start + args.batch_size]:
                try:
                    images.append(read_image_file(path))
                    readable.append(path)
                except (ImageReadError, FileNotFoundError) as error:
                    failures.append(str(error))
                    tqdm.write(f"anomalib-apc predict: skipped: {error}", file=sys.stderr)
            if images:
                result = inferencer.predict(images)
                for path, item, overlay in zip(readable, result, _as_list(visualizer.visualize(result)), strict=True):
                    label = "" if item.pred_label is None else ("anomalous" if bool(item.pred_label) else "normal")
                    scores.writerow([str(path), f"{float(item.pred_score):.6f}", label])
                    overlay_path = (overlay_root / path.resolve().relative_to(common_parent)).with_suffix(".png")
                    overlay_path.parent.mkdir(parents=True, exist_ok=True)
                    overlay.save(overlay_path)
            progress.update(len(files[start:start + args.batch_size]))
    print(f"Scored {len(files) - len(failures)} of {len(files)} images: {args.output / SCORES_FILE}, overlays in {overlay_root}.")
    if failures:
        print(f"anomalib-apc predict: {len(failures)} file(s) could not be read:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _common_parent(files: Sequence[Path]) -> Path:
    """The deepest folder holding every file, so overlays keep the inputs' sub-folders and cannot collide."""
    parents = [file.resolve().parent for file in files]
    common = parents[0]
    while not all(parent.is_relative_to(common) for parent in parents):
        common = common.parent
    return common


def _as_list(visualization: object) -> list:
    return visualization if isinstance(visualization, list) else [visualization]
