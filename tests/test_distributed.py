"""Data parallelism: two gloo ranks on CPU train the same parameters as one process with the same
global batch, through the real CLI under a torchrun-style environment."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loopgolf.cli import main
from loopgolf.train.checkpoint import read_checkpoint
from loopgolf.train.distributed import _buckets, context_from_env

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str]) -> None:
    """What ``torchrun --nproc_per_node world -m loopgolf ...`` does: one process per rank with
    the rendezvous in the environment (one thread each, as torchrun sets)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, "-m", "loopgolf", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (_out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
    assert outs[1][0].strip() == ""  # only rank 0 reports


def test_two_gloo_ranks_train_like_one_process(text_dataset, tmp_path, capsys):
    # Progressive recurrence (per-layer controls of the loop pass get no gradient in stage 0),
    # gradient accumulation on every rank, and a validation that only rank 0 runs.
    args = [
        "train",
        "--preset",
        "debug",
        "--data",
        str(text_dataset),
        "--plan",
        "mini-loop:3:1-1x1",
        "--per-layer-controls",
        "--train",
        "recurrence_stages=[0.5]",
        "--train",
        "micro_batch_tokens=64",
        "--steps",
        "6",
        "--seed",
        "2",
        "--quiet",
    ]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    launch(2, [*args, "--out", str(tmp_path / "two")])
    one, two = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert one["train"]["stage_steps"] == two["train"]["stage_steps"] == [0, 3]
    assert one["loader"] == two["loader"]  # the same tokens were consumed
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-5, abs=1e-6)
    for name, t in one["model"].items():
        torch.testing.assert_close(two["model"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    # Muon keeps its momentum on every rank, so rank 0's checkpoint holds all of it.
    muon_one, muon_two = one["optimizers"][-1]["state"], two["optimizers"][-1]["state"]
    assert muon_one.keys() == muon_two.keys()
    for i in muon_one:
        torch.testing.assert_close(muon_two[i]["momentum_buffer"], muon_one[i]["momentum_buffer"], rtol=1e-4, atol=1e-5)

    # The two-rank checkpoint resumes in one process like the one-process checkpoint.
    for run_dir in ("one", "two"):
        assert main(["train", "--resume", str(tmp_path / run_dir), "--steps", "8", "--quiet"]) == 0
    one, two = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert one["train"]["step"] == two["train"]["step"] == 8
    for name, t in one["model"].items():
        torch.testing.assert_close(two["model"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    capsys.readouterr()


def test_context_from_env():
    ctx = context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (3, 4, 1, False, True)
    single = context_from_env({})
    assert (single.rank, single.world_size, single.is_main, single.enabled) == (0, 1, True, False)
    with pytest.raises(ValueError, match="inconsistent"):
        context_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="integers"):
        context_from_env({"RANK": "zero", "WORLD_SIZE": "2"})


def test_gradient_buckets_keep_order_and_split_by_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(100), torch.zeros(2)]
    buckets = list(_buckets(ts, bucket_bytes=200))
    assert [[t.numel() for t in b] for b in buckets] == [[10, 30], [5], [100], [2]]
    assert all(a is b for a, b in zip([t for b in buckets for t in b], ts))
