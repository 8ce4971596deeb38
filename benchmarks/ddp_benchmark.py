"""Wall time of phase 1 and phase 2 on N DDP processes, and the memory bank they build; prints one JSON line.

``python benchmarks/ddp_benchmark.py --devices 2 --threads 1 --out runs/ddp2`` fits AnomalousPatchCore
twice on MPDD metal_plate (ResNet-18, random initial weights, 128 px): once without fine-tuning (the
memory bank, compared across device counts with ``--compare``) and once with ``--epochs`` epochs of
fine-tuning (phase 1 timing, metrics). Lightning's ``strategy="ddp"`` re-runs this script for the
other ranks; rank 0 writes ``OUT/result.json`` and ``OUT/memory_bank_finetune_off.pt``.
``--compare A B`` prints whether two runs' no-fine-tuning memory banks are identical.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from anomalib.engine import Engine

from anomalib_apc.benchmark.meter import RunMeter
from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.distributed import peak_memory_mib

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mpdd"


def fit_and_test(args: argparse.Namespace, epochs: int) -> tuple[dict, torch.Tensor]:
    """One fit and test; its phase times, metrics and memory bank."""
    datamodule = SupervisedMVTecAD(root=args.root, category=args.category, num_anomalies=10, train_batch_size=8,
                                   eval_batch_size=8, num_workers=0, seed=0)
    model = AnomalousPatchCore(backbone="resnet18", pre_trained=False, finetune_epochs=epochs, visualizer=False,
                               pre_processor=AnomalousPatchCore.configure_pre_processor(
                                   image_size=(args.image_size, args.image_size)))
    meter = RunMeter()
    engine = Engine(default_root_dir=Path(args.out) / f"epochs{epochs}", logger=False, accelerator="cpu",
                    devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    enable_progress_bar=False, callbacks=[meter])
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_wall_s = time.perf_counter() - start
    [metrics] = engine.test(model=model, datamodule=datamodule)
    record = {"phase1_s": meter.training_pass_s, "phase2_s": meter.fit_s, "fit_wall_s": fit_wall_s,
              "rank0_peak_memory_mib": peak_memory_mib(torch.device("cpu")),
              "memory_bank_rows": len(model.model.memory_bank),
              "metrics": {key: float(value) for key, value in metrics.items()}}
    return record, model.model.memory_bank.clone()


def main() -> None:
    """Run (or compare) and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", default="metal_plate")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out", default="runs/ddp_benchmark")
    parser.add_argument("--compare", nargs=2, metavar="OUT")
    args = parser.parse_args()
    if args.compare:
        banks = [torch.load(Path(out) / "memory_bank_finetune_off.pt") for out in args.compare]
        print(json.dumps({"memory_banks_identical": torch.equal(*banks), "rows": [len(bank) for bank in banks]}))
        return
    torch.set_num_threads(args.threads)
    off, bank = fit_and_test(args, epochs=0)
    on, _ = fit_and_test(args, epochs=args.epochs)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    result = {"devices": args.devices, "threads": args.threads, "image_size": args.image_size,
              "epochs": args.epochs, "finetune_off": off, "finetune_on": on}
    torch.save(bank, Path(args.out) / "memory_bank_finetune_off.pt")
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
