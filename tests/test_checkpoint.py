"""Checkpoints: exact resume (in-process and after a real SIGKILL through the CLI) and atomic
writes that never leave a half-written checkpoint under its name."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import markov_tokens, tiny_config, tiny_model

from loopgolf.cli import main
from loopgolf.config import get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec
from loopgolf.rundir import RunDir
from loopgolf.train.checkpoint import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    CheckpointPolicy,
    TrainState,
    check_resumable,
    load_model_state,
    model_state,
    read_checkpoint,
    save_checkpoint,
)
from loopgolf.train.optim import build_optimizers
from loopgolf.train.trainer import train
from loopgolf.util import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(30_000, vocab=64, seed=5))
    return path


def staged_setup(seed: int):
    """A mini-loop model with progressive recurrence, gradient accumulation and per-layer
    controls: every piece of state a resume has to restore."""
    cfg = tiny_config(num_heads=2, num_kv_heads=1, per_layer_controls=True, plan=PlanSpec("mini-loop", layers=3, loops=1, loop_start=1, loop_end=1))
    torch.manual_seed(seed)
    tcfg = replace(get_preset("debug").train, max_steps=10, micro_batch_tokens=128, recurrence_stages=[0.45], val_every=3)
    return GPT(cfg), tcfg


class Killed(Exception):
    pass


def test_resume_repeats_the_uninterrupted_loss_curve(shard, tmp_path):
    def run(model, tcfg, log, **kw):
        return train(
            model,
            TokenLoader([shard], tcfg.seq_len, seed=3),
            tcfg,
            device=torch.device("cpu"),
            log_path=log,
            validate=lambda m: {"val_loss": float(m.skip_weight.detach().sum()), "val_bpb": 0.0},
            progress=False,
            **kw,
        )

    model, tcfg = staged_setup(seed=11)
    full = run(model, tcfg, tmp_path / "full.jsonl")
    full_params = [p.detach().clone() for p in model.parameters()]

    # Interrupted: checkpoints every 4 steps, killed before step 7 runs.
    model, tcfg = staged_setup(seed=11)
    policy = CheckpointPolicy(tmp_path / "checkpoint.pt", every=4)

    def die(step, progress, m):
        if step == 7:
            raise Killed

    log = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        run(model, tcfg, log, checkpoint=policy, on_step=die)
    assert read_checkpoint(policy.path)["train"]["step"] == 4

    # Resumed into a model built from another seed: everything must come from the checkpoint.
    model, tcfg = staged_setup(seed=999)
    resumed = run(model, tcfg, log, checkpoint=policy, resume=read_checkpoint(policy.path))
    assert resumed.resumed_from == 4 and resumed.steps == 10
    assert resumed.losses == full.losses  # bit-for-bit on CPU
    assert resumed.stage_steps == full.stage_steps == [0, 5]
    assert resumed.val_history == full.val_history
    for a, b in zip(full_params, model.parameters()):
        assert torch.equal(a, b.detach())

    def curve(path):
        return [(r["step"], r["loss"]) for r in read_jsonl(path) if r["event"] == "train"]

    events = [r["event"] for r in read_jsonl(log)]
    assert curve(log) == curve(tmp_path / "full.jsonl")  # the killed run's records of steps 5-7 were cut
    assert events.count("stage") == 2 and events.count("resume") == 1
    assert read_checkpoint(policy.path)["train"]["step"] == 10  # the final checkpoint


KILL_AT_STEP = """
import os, signal, sys
import loopgolf.train.trainer as trainer
from loopgolf.cli import main

real = trainer.lr_multiplier
def lr_multiplier(step, elapsed, cfg):
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers
    return real(step, elapsed, cfg)
trainer.lr_multiplier = lr_multiplier
sys.exit(main(sys.argv[1:]))
"""


def test_cli_run_killed_then_resumed_matches_uninterrupted(text_dataset, tmp_path, capsys):
    common = ["--preset", "debug", "--data", str(text_dataset), "--plan", "cycle:2x2", "--seed", "5", "--quiet"]
    assert main(["run", *common, "--out", str(tmp_path / "full"), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)

    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP.format(step=5), "train", *common, "--out", str(killed), "--checkpoint-every", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert RunDir(killed).read_checkpoint()["train"]["step"] == 3

    # A resume may not change what the run is.
    assert main(["run", "--resume", str(killed), "--plan", "cycle:1x4"]) == 2
    err = capsys.readouterr().err
    assert "cannot change: model.plan (stored" in err and "given" in err  # the field, from the config's own resume rules

    assert main(["run", "--resume", str(killed), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == full["steps"] == 8
    for key in ("final_train_loss", "val_loss_pre", "val_bpb_pre", "val_bpb_post", "model_bytes"):
        assert resumed[key] == full[key], key

    def curve(run_dir):
        return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "log.jsonl") if r["event"] == "train"]

    assert curve(killed) == curve(tmp_path / "full")


def test_checkpoint_payload_and_config_checks(shard, tmp_path):
    model, tcfg = staged_setup(seed=1)
    train(
        model,
        TokenLoader([shard], tcfg.seq_len, seed=3),
        replace(tcfg, max_steps=2),
        device=torch.device("cpu"),
        progress=False,
        checkpoint=CheckpointPolicy(tmp_path / "c.pt", config={"model": model.config.to_dict(), "train": {"seq_len": 32}}),
    )
    ckpt = read_checkpoint(tmp_path / "c.pt")
    assert set(ckpt) >= {"model", "optimizers", "loader", "rng", "train", "config"}
    muon = ckpt["optimizers"][-1]["state"]
    assert len(muon) == sum(1 for n, p in model.named_parameters() if n.startswith(("attn.", "mlps.")) and p.ndim == 2)
    assert all("momentum_buffer" in s for s in muon.values())
    assert ckpt["loader"]["tokens_seen"] > 0 and ckpt["train"]["step"] == 2

    check_resumable(ckpt, model.config.to_dict(), {"seq_len": 32, "max_steps": 99, "time_budget": 5.0})  # budget may change
    with pytest.raises(ValueError, match="different model"):
        check_resumable(ckpt, {**model.config.to_dict(), "model_dim": 64}, {"seq_len": 32})
    with pytest.raises(ValueError, match="seq_len"):
        check_resumable(ckpt, model.config.to_dict(), {"seq_len": 64})

    (tmp_path / "bad.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupted"):
        read_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing")


def test_model_state_roundtrip_is_strict():
    cfg = tiny_config(num_heads=2, num_kv_heads=1, plan=PlanSpec("vanilla", layers=2))
    torch.manual_seed(0)
    a = GPT(cfg)
    state = model_state(a)
    torch.manual_seed(1)
    b = GPT(cfg)
    load_model_state(b, state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="does not match"):
        load_model_state(b, {k: v for k, v in state.items() if k != "tok_emb.weight"})


def _small_checkpoint(path: Path, fill: float) -> None:
    model = tiny_model(seed=0, num_heads=2, num_kv_heads=1, plan=PlanSpec("vanilla", layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    loader = TokenLoader([path.parent / "fineweb_train_000000.bin"], 32)
    save_checkpoint(
        path, model=model, optimizers=build_optimizers(model, get_preset("debug").train.optim, tied=True), loader=loader, state=TrainState(step=int(fill))
    )


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    write_shard(tmp_path / "fineweb_train_000000.bin", markov_tokens(1000, vocab=64))
    path = tmp_path / "checkpoint.pt"
    _small_checkpoint(path, 1.0)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the bytes went to the temporary file
    with pytest.raises(OSError):
        _small_checkpoint(path, 2.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "fineweb_train_000000.bin"]


WRITE_FOREVER = """
import sys, torch
from pathlib import Path
from loopgolf.train.checkpoint import save_checkpoint, TrainState
from loopgolf.data.shards import TokenLoader
path = Path(sys.argv[1])
loader = TokenLoader([path.parent / "fineweb_train_000000.bin"], 32)
model = torch.nn.Linear(1024, 1024)  # a few MB per checkpoint: each write takes a while
i = 0
while True:
    i += 1
    with torch.no_grad():
        model.weight.fill_(float(i))
    save_checkpoint(path, model=model, optimizers=[], loader=loader, state=TrainState(step=i))
    if i == 1:  # a whole checkpoint exists from here on, however slow the machine; the kill lands in later writes
        print("ready", flush=True)
"""


def test_checkpoint_killed_mid_write_is_never_half_visible(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", markov_tokens(1000, vocab=64))
    path = tmp_path / "checkpoint.pt"
    steps = []
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = read_checkpoint(path)  # whatever moment the kill hit, the file under the name is whole
        step = ckpt["train"]["step"]
        assert torch.all(ckpt["model"]["weight"] == float(step))
        steps.append(step)
    assert all(s >= 1 for s in steps)


def test_rng_states_are_restored(tmp_path):
    import random

    import numpy as np

    from loopgolf.train.checkpoint import restore_checkpoint

    write_shard(tmp_path / "fineweb_train_000000.bin", markov_tokens(1000, vocab=64))
    model = torch.nn.Linear(4, 4)
    loader = TokenLoader([tmp_path / "fineweb_train_000000.bin"], 32)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizers=[], loader=loader, state=TrainState(step=3))

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    expected = draws()
    draws()  # move every generator on
    state = restore_checkpoint(read_checkpoint(tmp_path / "c.pt"), model=model, optimizers=[], loader=loader)
    assert state.step == 3 and draws() == expected


# ------------------------------------------------------------ integrity container


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory) -> bytes:
    """The bytes of one small checkpoint written by save_checkpoint."""
    d = tmp_path_factory.mktemp("container")
    write_shard(d / "fineweb_train_000000.bin", markov_tokens(1000, vocab=64))
    _small_checkpoint(d / "checkpoint.pt", 3.0)
    return (d / "checkpoint.pt").read_bytes()


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_checkpoint_container_roundtrip(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", markov_tokens(1000, vocab=64))
    loader = TokenLoader([tmp_path / "fineweb_train_000000.bin"], 32)
    model = torch.nn.Linear(4, 4)
    size = save_checkpoint(tmp_path / "checkpoint.pt", model=model, optimizers=[], loader=loader, state=TrainState(step=7))
    blob = (tmp_path / "checkpoint.pt").read_bytes()
    assert size == len(blob)
    assert blob[:8] == MAGIC and int.from_bytes(blob[8:12], "little") == FORMAT_VERSION == 2
    assert int.from_bytes(blob[12:20], "little") == len(blob) - HEADER_SIZE == len(blob) - 52
    assert blob[20:52] == hashlib.sha256(blob[52:]).digest() and blob[52:54] == b"PK"
    ckpt = read_checkpoint(tmp_path)  # a run directory maps to its checkpoint.pt
    assert ckpt["format"] == 2 and ckpt["train"]["step"] == 7
    assert torch.equal(ckpt["model"]["weight"], model.weight.detach())


# The header's magic, version, length and digest fields; the zip's first local header, its middle
# (tensor bytes), and the sizes in the last entry of the central directory near the end.
FLIPS = {
    "magic": lambda b: 3,
    "version": lambda b: 8,
    "length": lambda b: 14,
    "digest": lambda b: 30,
    "payload start": lambda b: HEADER_SIZE + 10,
    "middle": lambda b: len(b) // 2,
    "central directory": lambda b: b.rfind(b"PK\x01\x02") + 20,
}


@pytest.mark.parametrize("where", list(FLIPS))
def test_flipped_bit_is_refused_before_unpickling(ckpt_bytes, tmp_path, monkeypatch, where):
    at = FLIPS[where](ckpt_bytes)
    assert 0 <= at < len(ckpt_bytes) and (where != "central directory" or at > len(ckpt_bytes) - 2000)
    blob = bytearray(ckpt_bytes)
    blob[at] ^= 0x10
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(blob))

    def unpickled(*a, **k):
        raise AssertionError("torch.load ran on an unverified checkpoint")

    monkeypatch.setattr(torch, "load", unpickled)
    _refused(path, "corrupted")
    if where not in ("magic", "version"):
        _refused(path, "refusing to resume")


def test_truncated_or_extended_file_is_refused(ckpt_bytes, tmp_path):
    path = tmp_path / "checkpoint.pt"
    for cut in (HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 100, len(ckpt_bytes) - 1):
        path.write_bytes(ckpt_bytes[:cut])
        _refused(path, "corrupted", "truncated")
    path.write_bytes(ckpt_bytes + b"\0")
    _refused(path, "corrupted", "1 trailing bytes")
    path.write_bytes(b"")
    _refused(path, "not a loopgolf checkpoint")
    payload = b"not a torch archive"  # a sound container around a foreign payload
    path.write_bytes(ckpt_bytes[:12] + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest() + payload)
    _refused(path, "not a readable")


def test_legacy_bare_zip_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": {"w": torch.zeros(3)}, "train": {"step": 1}}, path)  # what format 1 wrote
    _refused(path, "older loopgolf", "integrity digest", "cannot be verified")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_non_regular_files_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "checkpoint.pt"
    os.mkfifo(fifo)
    targets = [fifo, tmp_path] + ([Path("/dev/zero")] if Path("/dev/zero").exists() else [])
    results = {}

    def read_all():
        for t in targets:
            try:
                read_checkpoint(t)
                results[t] = "accepted"
            except ValueError as e:
                results[t] = str(e)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # release a reader blocked on the FIFO before failing
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        pytest.fail("read_checkpoint hung on a non-regular file")
    for t in targets:
        assert "is not a regular file" in results[t], results[t]
    assert str(fifo) in results[fifo] and str(fifo) in results[tmp_path]  # the directory maps to its checkpoint.pt


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at .*checkpoint.pt"):
        read_checkpoint(tmp_path)
