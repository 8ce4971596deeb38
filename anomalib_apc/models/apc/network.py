"""Building APC's network from its initial weights, reproducibly, and without them where that is enough.

A checkpoint (``anomalib test/export --ckpt_path``, ``load_from_checkpoint``) replaces the initial
weights anyway, so their absence (hub unreachable, ``init_weights`` file missing) only matters for
training: the network is then built on random weights and the error is handed back for the Lightning
module to raise when training starts.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalib_apc.errors import MissingInputError, PretrainedWeightsUnavailableError
from anomalib_apc.sampling import seeded_global_rngs

from .torch_model import AnomalousPatchCoreModel

logger = logging.getLogger(__name__)

InitialWeightsError = PretrainedWeightsUnavailableError | MissingInputError


def build_network(
    seed: int | None,
    pre_trained: bool,
    init_weights: str | Path | None,
    init_weights_key_map: Mapping[str, str] | None,
    **network: Any,
) -> tuple[AnomalousPatchCoreModel, InitialWeightsError | None]:
    """The network under ``seeded_global_rngs(seed)``, and the error of initial weights that could not be had.

    Args:
        seed: Seed of every random initial weight; ``None`` draws from the global generators.
        pre_trained: Start the encoder from timm's ImageNet weights.
        init_weights: Local checkpoint to start the encoder from.
        init_weights_key_map: Regex -> replacement pairs for the checkpoint's key names.
        network: The other arguments of :class:`AnomalousPatchCoreModel`.
    """
    try:
        with seeded_global_rngs(seed):
            model = AnomalousPatchCoreModel(
                pre_trained=pre_trained, init_weights=init_weights, init_weights_key_map=init_weights_key_map,
                **network,
            )
    except (PretrainedWeightsUnavailableError, MissingInputError) as error:
        with seeded_global_rngs(seed):
            model = AnomalousPatchCoreModel(pre_trained=False, init_weights=None, **network)
        logger.warning(
            "%s The encoder starts from random weights for now: loading a checkpoint works, training "
            "will stop with this error.", error,
        )
        return model, error
    return model, None
