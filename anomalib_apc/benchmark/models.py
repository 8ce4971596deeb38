"""The compared models, built on identical weights: APC and anomalib's Patchcore (one or two rows).

- One initialisation. Patchcore's feature extractor receives a copy of APC's encoder weights before
  APC fine-tunes them (:func:`copy_initial_weights`), so both start from identical weights whether
  they come from timm's hub, a checkpoint file (``init_weights``) or the seeded random generator.
- One coreset. :class:`SeededPatchcore` is anomalib's ``Patchcore`` whose coreset is drawn under the
  same seeded generators as APC's (``coreset_seed``), so that with identical features both keep
  identical memory-bank rows and a score difference is the features', not the coreset draw's.
"""

import logging
from typing import Any

import torch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max
from anomalib.models import Patchcore
from anomalib.models.components import AnomalibModule

from anomalib_apc.benchmark.results import Initialisation
from anomalib_apc.benchmark.settings import APC, PATCHCORE_FAST_CORESET, BenchmarkSettings
from anomalib_apc.errors import InvalidInputError
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.init_weights import PretrainedWeightsUnavailableError, create_encoder_backbone
from anomalib_apc.sampling import FastKCenterGreedy, seeded_global_rngs

logger = logging.getLogger(__name__)

METRIC_NAMES = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "pixel_AUPRO")
"""Names under which anomalib's ``Evaluator`` reports the metrics of :func:`make_evaluator`."""


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
    if settings.init_weights is not None:
        # Read once here: APC defers a missing file to its training, and Patchcore copies APC's weights,
        # so without this check Patchcore would run on random weights labelled as the checkpoint's.
        create_encoder_backbone(settings.backbone, pre_trained=False, init_weights=settings.init_weights)
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


class SeededPatchcore(Patchcore):
    """anomalib's ``Patchcore`` whose coreset is drawn under seeded generators.

    anomalib's sampler draws its projection and first center from the global random state, which
    after ``seed_everything`` and the data loading is whatever those left. Drawn under
    ``seeded_global_rngs(coreset_seed)`` instead, it selects exactly the rows APC's
    ``FastKCenterGreedy(seed=coreset_seed)`` selects from the same features (the two samplers choose
    identical indices under identical random states).

    Args:
        coreset_seed: Seed of the coreset draw (APC's ``coreset_seed``); ``None`` keeps anomalib's behaviour.
        fast_coreset: Select the coreset with ``FastKCenterGreedy`` (APC's sampler, same indices, faster)
            instead of anomalib's ``KCenterGreedy``, so that memory-bank times compare like with like.
        **patchcore_arguments: anomalib's ``Patchcore`` arguments.
    """

    def __init__(self, coreset_seed: int | None = 0, fast_coreset: bool = False, **patchcore_arguments: Any) -> None:
        super().__init__(**patchcore_arguments)
        self.coreset_seed = coreset_seed
        self.fast_coreset = fast_coreset

    def fit(self) -> None:
        """Subsample the collected patch embeddings into the memory bank, under ``coreset_seed``."""
        if not self.fast_coreset:
            with seeded_global_rngs(self.coreset_seed):
                super().fit()
            return
        store = self.model.embedding_store
        if not store:
            msg = "Patchcore's embedding store is empty: no normal training image was embedded."
            raise InvalidInputError(msg)
        embeddings = torch.vstack(store)
        store.clear()
        sampler = FastKCenterGreedy(embeddings, self.coreset_sampling_ratio, seed=self.coreset_seed)
        self.model.memory_bank = sampler.sample_coreset()


def make_evaluator() -> Evaluator:
    """anomalib's metrics on raw scores: AUROC and F1 at the F1-optimal threshold per level, and AUPRO."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )


def build_models(settings: BenchmarkSettings, initialisation: Initialisation, seed: int) -> dict[str, AnomalibModule]:
    """APC and anomalib's Patchcore (one or two) with the same backbone, layers, image size, weights and coreset seed.

    anomalib's post-processor and visualizer are left out: the min-max normalisation is monotonic
    and the adaptive threshold is exactly what ``F1Max`` finds, so they would change no figure, but
    would cost an extra validation pass over the test images for each model.
    """
    image_size = (settings.image_size, settings.image_size)
    components = {"post_processor": False, "visualizer": False}
    apc = AnomalousPatchCore(
        backbone=settings.backbone,
        layers=settings.layers,
        pre_trained=initialisation.pre_trained,
        init_weights=initialisation.init_weights,
        finetune_epochs=settings.finetune_epochs,
        coreset_sampling_ratio=settings.coreset_sampling_ratio,
        coreset_seed=seed,
        seed=seed,
        pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=image_size),
        evaluator=make_evaluator(),
        **components,
    )
    models: dict[str, AnomalibModule] = {}
    for name in settings.model_names:
        if name == APC:
            continue
        patchcore = SeededPatchcore(
            coreset_seed=seed,
            fast_coreset=name == PATCHCORE_FAST_CORESET,
            backbone=settings.backbone,
            layers=settings.layers,
            pre_trained=False,
            coreset_sampling_ratio=settings.coreset_sampling_ratio,
            pre_processor=Patchcore.configure_pre_processor(image_size=image_size),
            evaluator=make_evaluator(),
            **components,
        )
        copy_initial_weights(apc, patchcore)
        models[name] = patchcore
    models[APC] = apc
    return models


def copy_initial_weights(apc: AnomalousPatchCore, patchcore: Patchcore) -> None:
    """Give Patchcore's feature extractor APC's (not yet fine-tuned) encoder weights.

    Patchcore's timm feature extractor holds the backbone's stages up to the deepest memory-bank
    layer under the same names as APC's full encoder, so every tensor it has must be found.

    Raises:
        InvalidInputError: A tensor of Patchcore's extractor is missing from APC's encoder or differs in
            shape (a backbone whose timm feature extractor is built differently).
    """
    source = apc.model.feature_extractor.model.state_dict()
    target = patchcore.model.feature_extractor.feature_extractor
    unmatched = [
        name for name, tensor in target.state_dict().items()
        if name not in source or source[name].shape != tensor.shape
    ]  # fmt: skip
    if unmatched:
        msg = (
            f"--backbone {patchcore.model.backbone}: Patchcore's feature extractor does not match APC's encoder, "
            f"so both cannot start from the same weights; unmatched tensors: {unmatched[:5]}"
        )
        raise InvalidInputError(msg)
    target.load_state_dict({name: source[name] for name in target.state_dict()})
