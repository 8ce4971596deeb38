"""The one-class baselines of a benchmark: any anomalib model class, set up like APC where it can be.

A baseline is named by its class in ``anomalib.models`` (``Patchcore``, ``MHPatchcore``, ``Padim``,
...; case and underscores do not matter). It receives the benchmark's backbone, layers and
``pre_trained`` where its constructor takes them (read from its signature), a pre-processor of the
benchmark's image size, and APC's initial weights when its timm feature extractor has the same
tensors (:func:`copy_initial_weights`). A memory-bank model builds its memory bank under
``seeded_global_rngs(seed)`` (:func:`seeded_class`), as APC draws its coreset, so that its coreset
does not depend on what the data loading left in the global random state.
"""

import inspect
from functools import cache
from typing import Any

import anomalib.models
from anomalib.models.components import AnomalibModule, MemoryBankMixin, TimmFeatureExtractor
from torch import nn

from anomalib_apc.errors import InvalidInputError
from anomalib_apc.sampling import seeded_global_rngs


def _normalised(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


@cache
def _model_classes() -> dict[str, type[AnomalibModule]]:
    """anomalib's model classes by normalised name (``mh_patchcore`` and ``MHPatchcore`` both -> ``mhpatchcore``)."""
    classes = (getattr(anomalib.models, name, None) for name in anomalib.models.__all__)
    return {
        _normalised(cls.__name__): cls
        for cls in classes
        if isinstance(cls, type) and issubclass(cls, AnomalibModule) and not inspect.isabstract(cls)
    }


def resolve_baseline(name: str) -> type[AnomalibModule]:
    """The anomalib model class called ``name``.

    Raises:
        InvalidInputError: No model of anomalib has that name (the message lists them).
    """
    cls = _model_classes().get(_normalised(name))
    if cls is None:
        known = sorted(cls.__name__ for cls in _model_classes().values())
        msg = f"--baselines {name!r}: no such anomalib model; anomalib.models has {', '.join(known)}."
        raise InvalidInputError(msg)
    return cls


def baseline_row(name: str) -> str:
    """The row name of baseline ``name``: its anomalib class name (``mh_patchcore`` -> ``MHPatchcore``)."""
    return resolve_baseline(name).__name__


def shared_arguments(cls: type[AnomalibModule], **arguments: Any) -> dict[str, Any]:
    """The ``arguments`` (backbone, layers, pre_trained, ...) that ``cls``'s constructor takes."""
    parameters = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in arguments.items() if key in parameters}


class SeededMemoryBank:
    """Mixin for an anomalib memory-bank model: ``fit()`` (the memory bank, its coreset) runs under a fixed seed."""

    coreset_seed: int | None = None

    def fit(self) -> None:
        """The model's own memory-bank fit, under ``seeded_global_rngs(coreset_seed)``."""
        with seeded_global_rngs(self.coreset_seed):
            super().fit()  # type: ignore[misc]


@cache
def seeded_class(cls: type[AnomalibModule]) -> type[AnomalibModule]:
    """``cls`` with :class:`SeededMemoryBank` mixed in when it is a memory-bank model, else ``cls`` itself."""
    if not issubclass(cls, MemoryBankMixin):
        return cls
    return type(cls.__name__, (SeededMemoryBank, cls), {"__module__": __name__, "__doc__": cls.__doc__})


def timm_feature_extractor(model: nn.Module) -> nn.Module | None:
    """The timm network inside a baseline's (first) ``TimmFeatureExtractor``, or ``None`` when it has none."""
    return next(
        (module.feature_extractor for module in model.modules() if isinstance(module, TimmFeatureExtractor)), None
    )


def copy_initial_weights(apc: nn.Module, baseline: nn.Module) -> None:
    """Give a baseline's timm feature extractor APC's (not yet fine-tuned) encoder weights.

    A timm feature extractor holds the backbone's stages up to the deepest memory-bank layer under
    the names of APC's full encoder (``layer2.0.conv1.weight`` for a ResNet), except that it flattens
    some sequentials (vgg16_bn's ``features.32.weight`` is its ``features_32.weight``): names are
    compared with ``.`` and ``_`` alike, and every tensor it has must be found.

    Args:
        apc: An ``AnomalousPatchCore`` (its encoder is read).
        baseline: An anomalib model with a ``TimmFeatureExtractor``.

    Raises:
        InvalidInputError: The baseline has no timm feature extractor, or one of its tensors is missing from
            APC's encoder or differs in shape (a backbone whose timm feature extractor is built differently).
    """
    target = timm_feature_extractor(baseline)
    name = type(baseline).__name__.removeprefix("Seeded")
    if target is None:
        msg = f"{name} has no timm feature extractor to receive APC's initial weights."
        raise InvalidInputError(msg)
    source = {_flat(key): tensor for key, tensor in apc.model.feature_extractor.model.state_dict().items()}
    unmatched = [
        key for key, tensor in target.state_dict().items()
        if _flat(key) not in source or source[_flat(key)].shape != tensor.shape
    ]  # fmt: skip
    if unmatched:
        msg = (
            f"{name}'s feature extractor does not match APC's encoder, so both cannot start from the same "
            f"weights; unmatched tensors: {unmatched[:5]}"
        )
        raise InvalidInputError(msg)
    target.load_state_dict({key: source[_flat(key)] for key in target.state_dict()})


def _flat(key: str) -> str:
    """A tensor name with ``.`` as ``_``: timm's feature extractors flatten some sequentials (vgg's
    ``features.32.weight`` becomes ``features_32.weight``), the full network does not."""
    return key.replace(".", "_")
