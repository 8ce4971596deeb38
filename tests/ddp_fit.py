"""Fits and tests a tiny AnomalousPatchCore on 1 or N CPU processes; run by tests/test_ddp.py.

``python tests/ddp_fit.py DATASET_ROOT CATEGORY OUT_DIR DEVICES RUN...``: with DEVICES > 1 Lightning's
``strategy="ddp"`` (gloo) re-runs this script for the other ranks. For each RUN, ``finetune_off``
(``finetune_epochs=0``), ``finetune_on`` (one epoch) or ``chunked_on_disk`` (no fine-tuning, the chunked coreset
of patches in a memory-mapped file), every rank writes ``OUT_DIR/<run>_rank<r>.pt``: its
fitted memory bank and threshold, the test metrics, the last training loss and the checkpoint's path.
"""

import os
import sys
from pathlib import Path

import torch
from anomalib.engine import Engine

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.models import AnomalousPatchCore

RUNS = {"finetune_off": {"finetune_epochs": 0}, "finetune_on": {"finetune_epochs": 1},
        "chunked_on_disk": {"finetune_epochs": 0, "coreset_sampler": "chunked", "coreset_chunk_rows": 100,
                            "patch_storage": "disk"}}


def main(root: str, category: str, out_dir: str, devices: int, runs: list[str]) -> None:
    """The ``runs`` on ``devices`` CPU processes."""
    torch.set_num_threads(1)
    for name in runs:
        datamodule = SupervisedMVTecAD(root=root, category=category, num_anomalies=4, train_batch_size=4,
                                       eval_batch_size=4, num_workers=0, seed=0)
        model = AnomalousPatchCore(
            backbone="resnet18", pre_trained=False, learning_rate=1e-3, **RUNS[name],
            coreset_sampling_ratio=0.5, visualizer=False, finetune_precision="32",
            pre_processor=AnomalousPatchCore.configure_pre_processor(image_size=(64, 64)),
        )
        # One workspace per rank: anomalib's versioned folder (v0, v1, ...) is not rank-aware, and from the second
        # run on both ranks are already running when they pick it, so a shared root races to create the same v0.
        workspace = Path(out_dir) / name / f"rank{os.environ.get('LOCAL_RANK', '0')}"
        engine = Engine(default_root_dir=workspace, logger=False, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", enable_progress_bar=False)
        engine.fit(model=model, datamodule=datamodule)
        loss = engine.trainer.callback_metrics.get("train_loss")
        [metrics] = engine.test(model=model, datamodule=datamodule)
        torch.save({
            "memory_bank": model.model.memory_bank.clone(),
            "image_threshold": model.post_processor.image_threshold.clone(),
            "metrics": {key: float(value) for key, value in metrics.items()},
            "train_loss": None if loss is None else float(loss),
            "checkpoint": engine.trainer.checkpoint_callback.best_model_path,
        }, Path(out_dir) / f"{name}_rank{engine.trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
