"""Several devices with Lightning's DDP: the sampler shards, the gather and broadcast of phase 2, and 1 vs 2 processes.

The end-to-end test fits the same tiny model on 1 and on 2 CPU processes (``strategy="ddp"``, gloo;
Lightning re-runs ``tests/ddp_fit.py`` for the second rank, so the runs are subprocesses of that
script): without fine-tuning the memory bank, threshold and test metrics are identical; with it,
the DDP checkpoint tested in this process gives the metrics the DDP run reported.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from anomalib_apc.data import SupervisedMVTecAD
from anomalib_apc.data.sampler import ContiguousShardSampler, TrainDrawSampler
from anomalib_apc.models import AnomalousPatchCore
from anomalib_apc.models.apc.distributed import RankFailedError, broadcast_from_rank0, gather_rows, shard_batches

SCRIPT = Path(__file__).with_name("ddp_fit.py")


@pytest.mark.parametrize("balanced", [True, False])
def test_train_draws_are_one_seeded_sequence_split_rank_by_rank(balanced: bool) -> None:
    labels = [0] * 6 + [1] * 2
    one = list(TrainDrawSampler(labels, balanced=balanced, seed=3))
    ranks = [list(TrainDrawSampler(labels, balanced=balanced, seed=3, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert [len(draws) for draws in ranks] == [4, 4]
    interleaved = [draw for pair in zip(*ranks, strict=True) for draw in pair]
    assert interleaved == one  # 8 draws on 2 ranks are the 8 single-process draws, none twice
    assert ranks == [list(TrainDrawSampler(labels, balanced=balanced, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]


def test_train_draws_give_every_rank_as_many_steps() -> None:
    labels = [0] * 5 + [1] * 2  # 7 images on 2 ranks: 4 draws each, the permutation's first draw repeated
    ranks = [list(TrainDrawSampler(labels, balanced=False, seed=0, num_replicas=2, rank=rank)) for rank in (0, 1)]
    indices = [index for pair in zip(*ranks, strict=True) for index, _ in pair]
    assert [len(draws) for draws in ranks] == [4, 4]
    assert sorted(indices[:7]) == list(range(7))
    assert indices[7] == indices[0]
    assert isinstance(TrainDrawSampler(labels, balanced=True, seed=0), DistributedSampler)  # Lightning keeps it


def test_evaluation_shards_are_contiguous_runs_of_whole_batches() -> None:
    shards = [list(ContiguousShardSampler(10, batch_size=3, num_replicas=3, rank=rank)) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [list(ContiguousShardSampler(10, 3, 2, rank)) for rank in (0, 1)] == [list(range(6)), list(range(6, 10))]
    assert [len(ContiguousShardSampler(2, 4, 2, rank)) for rank in (0, 1)] == [0, 2]


def test_normal_image_batches_are_split_into_contiguous_runs() -> None:
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=3)
    batches = [[batch.tolist() for (batch,) in shard_batches(loader, rank, 2)] for rank in (0, 1)]
    assert batches == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9]]]


def _gather_and_broadcast(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = torch.arange(12.0).reshape(6, 2)[:2] if rank == 0 else torch.arange(12.0).reshape(6, 2)[2:]
        gathered = gather_rows(rows)
        bank = broadcast_from_rank0(lambda: gathered[::2] * 10, device=torch.device("cpu"), dtype=torch.float32)
        failure = None
        try:
            broadcast_from_rank0(lambda: torch.zeros(()).reshape(2), device=torch.device("cpu"), dtype=torch.float32)
        except (RankFailedError, RuntimeError) as error:
            failure = type(error).__name__
        results[rank] = (None if gathered is None else gathered.tolist(), bank.tolist(), failure)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_rows_gathered_on_rank0_in_rank_order_and_broadcast(tmp_path: Path) -> None:
    with multiprocessing.Manager() as manager:
        results = manager.dict()
        multiprocessing.spawn(_gather_and_broadcast, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    rows = torch.arange(12.0).reshape(6, 2)
    assert results[0][0] == rows.tolist()  # rank 0's 2 rows, then rank 1's 4: the single-process order
    assert results[1][0] is None
    assert results[0][1] == results[1][1] == (rows[::2] * 10).tolist()
    assert results[0][2] == "RuntimeError"  # rank 0's own error
    assert results[1][2] == "RankFailedError"  # rank 1 is told instead of waiting forever


def _fit(tiny_dataset, out_dir: Path, devices: int, runs: list[str]) -> subprocess.Popen:
    out_dir.mkdir()
    command = [sys.executable, str(SCRIPT), str(tiny_dataset.root), tiny_dataset.category, str(out_dir), str(devices),
               *runs]
    log = (out_dir / "log.txt").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"})


@pytest.mark.integration
def test_two_processes_build_the_one_process_memory_bank_and_scores(tiny_dataset, tmp_path: Path) -> None:
    runs = {1: _fit(tiny_dataset, tmp_path / "devices1", 1, ["finetune_off", "chunked_on_disk"]),
            2: _fit(tiny_dataset, tmp_path / "devices2", 2, ["finetune_off", "finetune_on", "chunked_on_disk"])}
    for devices, run in runs.items():
        assert run.wait(timeout=400) == 0, (tmp_path / f"devices{devices}" / "log.txt").read_text()[-4000:]

    def result(devices: int, name: str, rank: int = 0) -> dict:
        return torch.load(tmp_path / f"devices{devices}" / f"{name}_rank{rank}.pt", weights_only=False)

    single, ddp = result(1, "finetune_off"), result(2, "finetune_off")
    assert torch.equal(ddp["memory_bank"], single["memory_bank"])
    assert torch.equal(result(2, "finetune_off", rank=1)["memory_bank"], single["memory_bank"])
    assert torch.equal(ddp["image_threshold"], single["image_threshold"])
    assert ddp["metrics"] == single["metrics"]
    checkpoint = torch.load(ddp["checkpoint"], map_location="cpu", weights_only=False)
    assert torch.equal(checkpoint["state_dict"]["model.memory_bank"], single["memory_bank"])

    chunked = result(1, "chunked_on_disk")  # the ranks shared the chunked sampler's products
    assert torch.equal(result(2, "chunked_on_disk")["memory_bank"], chunked["memory_bank"])
    assert torch.equal(result(2, "chunked_on_disk", rank=1)["memory_bank"], chunked["memory_bank"])
    assert not torch.equal(chunked["memory_bank"], single["memory_bank"])  # another sampler: another bank
    assert chunked["memory_bank"].shape == single["memory_bank"].shape  # of anomalib's size

    tuned = result(2, "finetune_on")
    assert math.isfinite(tuned["train_loss"])
    assert torch.equal(result(2, "finetune_on", rank=1)["memory_bank"], tuned["memory_bank"])
    model = AnomalousPatchCore.load_from_checkpoint(tuned["checkpoint"], map_location="cpu")
    assert torch.equal(model.model.memory_bank, tuned["memory_bank"])
    from anomalib.engine import Engine

    datamodule = SupervisedMVTecAD(root=tiny_dataset.root, category=tiny_dataset.category, num_anomalies=4,
                                   eval_batch_size=4, num_workers=0, seed=0)
    engine = Engine(default_root_dir=tmp_path / "test", logger=False, accelerator="cpu", enable_progress_bar=False)
    [metrics] = engine.test(model=model, datamodule=datamodule)
    assert {key: float(value) for key, value in metrics.items()} == pytest.approx(tuned["metrics"], abs=1e-6)


@pytest.mark.parametrize(("rank", "drawn"), [(0, True), (1, False)])
def test_phase_2_draws_its_progress_bar_on_rank_0_only(rank: int, drawn: bool, capsys: pytest.CaptureFixture) -> None:
    from anomalib_apc.models.apc.memory_bank import progress

    assert list(progress(iter(range(3)), "Embedding normal training images", rank)) == [0, 1, 2]
    assert ("Embedding normal training images" in capsys.readouterr().err) is drawn
