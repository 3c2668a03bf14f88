"""Uptraining losses: the KL is the hand-computed one and is really used; exit losses at weight 0
change nothing, bit for bit, and at weight > 0 every loop's loss is logged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config

from loopgolf.config import TrainConfig
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec
from loopgolf.train.distill import TrainingObjective, kl_to
from loopgolf.train.trainer import train


def test_kl_equals_the_hand_computed_value():
    teacher = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    student = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    for temp in (1.0, 2.0):
        expected = 0.0
        for t_row, s_row in zip(teacher.tolist(), student.tolist()):
            pt = [math.exp(x / temp) for x in t_row]
            ps = [math.exp(x / temp) for x in s_row]
            pt = [x / sum(pt) for x in pt]
            ps = [x / sum(ps) for x in ps]
            expected += sum(p * math.log(p / q) for p, q in zip(pt, ps))
        assert float(kl_to(teacher, student, temp)) == pytest.approx(expected / 2, rel=1e-6)
    assert float(kl_to(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)


def _pair():
    torch.manual_seed(0)
    teacher = GPT(tiny_config(vocab_size=48, plan=PlanSpec("vanilla", layers=4), tie_embeddings=False))
    with torch.no_grad():
        teacher.lm_head.weight.normal_(0, 0.5)
    torch.manual_seed(1)
    student = GPT(tiny_config(vocab_size=48, plan=PlanSpec("cycle", layers=2, loops=2)))
    return teacher, student


def test_distillation_is_used_in_the_loss_and_the_gradient():
    teacher, student = _pair()
    x = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(3))
    plain = TrainingObjective(student)(x, y)
    assert torch.equal(plain, student(x, y))
    losses, grads = [], []
    for w in (0.0, 0.5, 1.0):
        obj = TrainingObjective(student, teacher=teacher, distill_weight=w, distill_temp=2.0)
        loss = obj(x, y)
        loss.backward()
        grads.append(student.tok_emb.weight.grad.clone())
        student.zero_grad()
        losses.append(float(loss.detach()))
        parts = obj.log_values()
        if w == 0:
            assert "kd" not in parts  # weight 0: the teacher is not even run
            continue
        with torch.no_grad():
            assert parts["kd"] == pytest.approx(4.0 * float(kl_to(teacher.logits(x), student.logits(x), 2.0)), rel=1e-5)
    assert losses[0] == pytest.approx(float(plain))
    assert len({round(v, 6) for v in losses}) == 3  # the logged loss changes with the weight
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])
    assert all(p.grad is None for p in teacher.parameters())  # the teacher takes no gradient
    with torch.no_grad():
        mixed = 0.5 * student(x, y) + 0.5 * 4.0 * kl_to(teacher.logits(x), student.logits(x), 2.0)
    assert losses[1] == pytest.approx(float(mixed), rel=1e-5)
    assert obj.teacher_seconds > 0 and not teacher.training


def _loader(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "train_000000.bin"
    if not path.exists():
        write_shard(path, rng.integers(0, 48, size=20_000).astype(np.uint16))
    return TokenLoader([path], 16, seed=seed, vocab_size=48)


def _train(tmp_path, exit_weight: float | None, log_name: str):
    torch.manual_seed(5)
    model = GPT(tiny_config(vocab_size=48, plan=PlanSpec("cycle", layers=2, loops=3)))
    cfg = TrainConfig(seq_len=16, batch_tokens=128, max_steps=6, time_budget=None, log_every=1, warmdown_frac=0.5)
    forward = None if exit_weight is None else TrainingObjective(model, exit_weight=exit_weight)
    result = train(model, _loader(tmp_path), cfg, device=torch.device("cpu"), forward=forward, progress=False, log_path=tmp_path / log_name)
    return model, result


def test_exit_loss_weight_zero_is_plain_training_bit_for_bit(tmp_path):
    plain, r_plain = _train(tmp_path, None, "plain.jsonl")
    zero, r_zero = _train(tmp_path, 0.0, "zero.jsonl")
    assert r_plain.losses == r_zero.losses
    for (name, a), (_, b) in zip(plain.state_dict().items(), zero.state_dict().items()):
        assert torch.equal(a, b), name
    exits, r_exit = _train(tmp_path, 0.1, "exit.jsonl")
    assert r_exit.losses != r_plain.losses
    records = [json.loads(line) for line in (tmp_path / "exit.jsonl").read_text().splitlines()]
    parts = [r["parts"] for r in records if r["event"] == "train"]
    assert len(parts) == 6 and all(len(p["loop_ce"]) == 3 for p in parts)  # one loss per loop, the final last
    assert all(p["loop_ce"][-1] == p["ce"] for p in parts)


def test_exit_losses_need_loops_and_weights_are_checked():
    vanilla = GPT(tiny_config(vocab_size=48, plan=PlanSpec("vanilla", layers=2)))
    with pytest.raises(ValueError, match="more than one pass"):
        TrainingObjective(vanilla, exit_weight=0.1)
    with pytest.raises(ValueError, match="teacher"):
        TrainingObjective(vanilla, distill_weight=0.5)
    with pytest.raises(ValueError):
        TrainingObjective(vanilla, teacher=vanilla, distill_weight=1.5)
