"""The bundle's ``metadata.json``: what the inferencer must know besides the graph and the indexes.

It is the contract between ``export_bundle`` and ``ApcInferencer``: written once at export, checked
field by field at load, so that a bundle of another format version, another architecture or with a
missing file is refused with a message naming the problem instead of failing somewhere inside
OpenVINO or faiss.

Every field but ``provenance`` drives inference; ``provenance`` records what made the bundle (for
people and audits) and drives nothing. The whole file is sealed by ``content_sha256``, the SHA-256
of every other field, so an edit (a threshold set by hand, swapped min/max statistics) is refused at
load like a changed byte of the graph: a wrong answer from an edited file is worse than no answer.
The seal detects edits, it does not authenticate the exporter (no key is involved).
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_apc.errors import InvalidInputError, MissingInputError

BUNDLE_FORMAT = "anomalib-apc-bundle"
# Version 2: SHA-256 of every file and the source checkpoint's identity. Version 4: the metadata sealed by
# its own SHA-256, descriptive fields under ``provenance``, no ``normalization`` (the pre-processor is applied).
# Version 5: one graph (a second output with segmentation fusion), the memory bank's source and compact codes.
BUNDLE_FORMAT_VERSION = 5
ARCHITECTURE = "AnomalousPatchCore"

METADATA_FILE = "metadata.json"
GRAPH_FILE = "embedding.xml"
MEMORY_BANK_FILE = "memory_bank.faiss"
BOUND_PROJECTION_FILE = "bound_projection.npz"
APPROXIMATE_INDEX_FILE = "approximate_index.faiss"

CONTENT_DIGEST_FIELD = "content_sha256"

GRAPH_INPUT = "images"
GRAPH_OUTPUT = "patch_embeddings"
DEFECT_PROBABILITY_OUTPUT = "defect_probability"


@dataclass(frozen=True)
class BundleMetadata:
    """Everything ``metadata.json`` records.

    Attributes:
        num_neighbors: Neighbours of PatchCore's score re-weighting.
        image_size: ``(H, W)`` the graph takes (after the pre-processor).
        embedding_dim: Features per patch, ``D``.
        feature_map_size: ``(h, w)`` patches per image.
        memory_bank_size: Rows of the memory bank.
        precision: ``fp32``, ``fp16`` or ``int8`` weights of the graph.
        pre_processor: anomalib ``PreProcessor.checkpoint_config()`` (the transform as plain data).
        post_processor: ``{"class_path", "config", "state"}`` of the anomalib post-processor (its
            thresholds and min/max statistics in ``state``), or ``None`` for raw scores.
        anomaly_map_sigma: Gaussian sigma of PatchCore's anomaly-map smoothing.
        segmentation_fusion: Exponent of the defect probability (the graph's second output) that
            weights the anomaly map; 0: PatchCore's map, and a graph with one output.
        exact_search: The lower bound that speeds up exact search (``{"file", "dim",
            "explained_variance", "candidates", "settled_fraction", "measured_speedup_vs_brute_force",
            "measured_on"}``), or ``None`` where it was no faster than brute force at export.
        approximate_search: ``{"file", "type", "factory", "search_parameters", "candidates",
            "recall_at_1", "mean_relative_distance_error", "max_relative_distance_error",
            "mean_exact_distance", "bytes", "recall_queries", "recall_query_source"}``, or ``None``.
        checksums: ``{file name: SHA-256}`` of every file but ``metadata.json``, checked at load.
        provenance: What made the bundle, driving nothing: ``backbone`` (timm name), ``layers``
            (memory-bank stages), ``versions`` (of the packages that wrote it), ``source_checkpoint``
            (``{"path", "name", "sha256", "epoch", "global_step"}`` or ``None`` for a model in memory)
            and ``verification`` (parity with the PyTorch model measured at export, or ``None``).
        format: Always ``BUNDLE_FORMAT``.
        format_version: ``BUNDLE_FORMAT_VERSION`` of the writer.
        architecture: Always ``ARCHITECTURE``.
    """

    num_neighbors: int
    image_size: tuple[int, int]
    embedding_dim: int
    feature_map_size: tuple[int, int]
    memory_bank_size: int
    precision: str
    pre_processor: dict[str, Any]
    post_processor: dict[str, Any] | None
    anomaly_map_sigma: float
    segmentation_fusion: float
    exact_search: dict[str, Any] | None
    approximate_search: dict[str, Any] | None
    checksums: dict[str, str]
    provenance: dict[str, Any]
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION
    architecture: str = ARCHITECTURE

    def files(self) -> list[str]:
        """The files of the bundle besides ``metadata.json``."""
        files = [GRAPH_FILE, GRAPH_FILE.replace(".xml", ".bin"), MEMORY_BANK_FILE]
        files += [search["file"] for search in (self.exact_search, self.approximate_search) if search]
        return files

    def write(self, directory: Path) -> Path:
        """Write ``metadata.json`` into ``directory``, sealed (NaN statistics as ``null``, valid JSON)."""
        path = directory / METADATA_FILE
        path.write_text(json.dumps(sealed(_nan_to_none(dataclasses.asdict(self))), indent=2) + "\n")
        return path


def content_digest(fields: dict[str, Any]) -> str:
    """SHA-256 of the metadata's fields other than ``content_sha256``, in a canonical JSON form."""
    content = {name: value for name, value in fields.items() if name != CONTENT_DIGEST_FIELD}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with their ``content_sha256``."""
    return {**fields, CONTENT_DIGEST_FIELD: content_digest(fields)}


def read_metadata(bundle: str | Path) -> BundleMetadata:
    """Read and check a bundle's metadata and the presence of its files.

    Raises:
        MissingInputError: ``bundle`` is not a folder, or ``metadata.json`` or a file it lists is missing.
        InvalidInputError: The metadata is not valid JSON, is of another format, format version or
            architecture, was edited after export (its ``content_sha256``), lacks fields, or has a
            ``num_neighbors`` outside 1 .. memory-bank rows.
    """
    directory = Path(bundle)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        msg = f"{directory}: no such bundle folder."
        raise MissingInputError(msg)
    if not path.is_file():
        msg = f"{path} is missing: {directory} is not a bundle written by `anomalib-apc export-bundle`."
        raise MissingInputError(msg)
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{path}: not valid JSON ({error})."
        raise InvalidInputError(msg) from error
    if not isinstance(fields, dict) or fields.get("format") != BUNDLE_FORMAT:
        found = fields.get("format") if isinstance(fields, dict) else None
        msg = f"{path}: not an anomalib-apc bundle (format {found!r})."
        raise InvalidInputError(msg)
    if fields.get("format_version") != BUNDLE_FORMAT_VERSION:
        msg = (
            f"{path}: bundle format version {fields.get('format_version')!r}, but this anomalib-apc reads version "
            f"{BUNDLE_FORMAT_VERSION}; export the bundle again with this version (`anomalib-apc export-bundle`)."
        )
        raise InvalidInputError(msg)
    if fields.get("architecture") != ARCHITECTURE:
        msg = (f"{path}: a bundle of architecture {fields.get('architecture')!r}; "
               f"ApcInferencer runs {ARCHITECTURE!r} only.")
        raise InvalidInputError(msg)
    if fields.get(CONTENT_DIGEST_FIELD) != content_digest(fields):
        msg = (f"{path}: its contents do not match the SHA-256 recorded in it ({CONTENT_DIGEST_FIELD}): the file "
               "was edited after export; export the bundle again instead of editing it.")
        raise InvalidInputError(msg)
    del fields[CONTENT_DIGEST_FIELD]
    expected = {field.name for field in dataclasses.fields(BundleMetadata)}
    missing, unknown = sorted(expected - set(fields)), sorted(set(fields) - expected)
    if missing or unknown:
        msg = (f"{path}: metadata fields missing {missing} / unknown {unknown} "
               f"for format version {BUNDLE_FORMAT_VERSION}.")
        raise InvalidInputError(msg)
    for name in ("image_size", "feature_map_size"):
        fields[name] = tuple(fields[name])
    metadata = BundleMetadata(**fields)
    _check_num_neighbors(path, metadata)
    absent = [name for name in metadata.files() if not (directory / name).is_file()]
    if absent:
        msg = f"{directory}: bundle file(s) missing: {', '.join(absent)}; export the bundle again."
        raise MissingInputError(msg)
    return metadata


def _check_num_neighbors(path: Path, metadata: BundleMetadata) -> None:
    """PatchCore re-weights a score by ``num_neighbors`` memory-bank rows: at least one, at most all of them."""
    neighbors, rows = metadata.num_neighbors, metadata.memory_bank_size
    if not isinstance(neighbors, int) or isinstance(neighbors, bool) or not 1 <= neighbors <= rows:
        msg = f"{path}: num_neighbors is {neighbors!r}, but must be an integer from 1 to the {rows} memory-bank rows."
        raise InvalidInputError(msg)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(item) for item in value]
    return value
