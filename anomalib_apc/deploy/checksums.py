"""SHA-256 of a bundle's files, recorded in ``metadata.json`` at export and checked at load.

A bundle's files only make sense together: an ``embedding.bin`` or ``memory_bank.faiss`` copied in
from another bundle of the same architecture has the right shapes and loads, but gives wrong
scores. Their digests, written by the exporter, let the inferencer refuse such a mix naming the file.
"""

import hashlib
from collections.abc import Iterable
from pathlib import Path

from anomalib_apc.errors import InvalidInputError

CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_checksums(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """``{file name: SHA-256}`` of the given files of a bundle."""
    return {name: file_sha256(directory / name) for name in names}


def verify_checksums(directory: Path, recorded: dict[str, str], names: Iterable[str]) -> None:
    """Refuse a bundle where a file has no recorded digest or another digest than recorded.

    Raises:
        InvalidInputError: Naming the first file that does not match.
    """
    for name in names:
        path = directory / name
        if name not in recorded:
            msg = f"{path}: metadata.json records no SHA-256 for this file; export the bundle again."
            raise InvalidInputError(msg)
        if file_sha256(path) != recorded[name]:
            msg = (
                f"{path}: its SHA-256 differs from the one metadata.json records: the file was changed or comes "
                "from another bundle; export the bundle again."
            )
            raise InvalidInputError(msg)
