import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import markov_tokens, tiny_config

from loopgolf.config import OptimizerConfig, TrainConfig, get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.train.optim import Muon, build_optimizers, newton_schulz, split_parameters
from loopgolf.train.trainer import accumulation_steps, lr_multiplier, train

ASSETS = Path(__file__).parent / "assets"
# A looped, relaxed variant of the debug model: 2 stored blocks run twice (4 virtual layers) with
# per-virtual-layer LoRA on q, v and the MLP input, unshared per-layer controls and depth
# embeddings, so the golden curve covers the plan, adapter and control code paths too.
LOOPED_RELAXED = {
    "plan": {"kind": "cycle", "layers": 2, "loops": 2},
    "lora_ranks": {"q": 2, "v": 2, "mlp_in": 2},
    "per_layer_controls": True,
    "depth_embeddings": True,
}
GOLDEN_CASES = {"debug": ({}, ASSETS / "golden_loss_debug.json"), "looped-relaxed": (LOOPED_RELAXED, ASSETS / "golden_loss_looped_relaxed.json")}


@pytest.fixture(scope="module")
def train_shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(40_000, vocab=64, seed=3))
    return path


def debug_setup(seed: int = 1337, **model_changes):
    preset = get_preset("debug")
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": 64, **model_changes})
    torch.manual_seed(seed)
    return GPT(cfg), preset.train


def test_newton_schulz_orthogonalizes():
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=5)
    s = torch.linalg.svdvals(x)
    # The quintic iteration drives singular values into a band around 1 (not exactly 1).
    assert s.min() > 0.5 and s.max() < 1.3
    assert x.shape == g.shape
    assert newton_schulz(g.T).shape == g.T.shape


def test_every_parameter_in_exactly_one_group():
    model = GPT(tiny_config(tie_embeddings=False, plan=PlanSpec("cycle", layers=2, loops=2)))
    roles = split_parameters(model)
    names = [n for group in roles.values() for n, _ in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(n.startswith(("attn.", "mlps.")) for n, _ in roles["matrix"])
    assert {n for n, _ in roles["scalar"]} >= {"attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight"}
    opts = build_optimizers(model, OptimizerConfig(), tied=False)
    assert isinstance(opts[-1], Muon)


def test_lr_multiplier_warmdown_by_steps_and_time():
    cfg = TrainConfig(seq_len=8, batch_tokens=64, max_steps=100, time_budget=None, warmdown_frac=0.2)
    assert lr_multiplier(0, 0.0, cfg) == 1.0
    assert lr_multiplier(79, 0.0, cfg) == 1.0
    assert lr_multiplier(90, 0.0, cfg) == pytest.approx(0.5)
    assert lr_multiplier(100, 0.0, cfg) == 0.0
    timed = replace(cfg, max_steps=None, time_budget=10.0)
    assert lr_multiplier(5, 9.0, timed) == pytest.approx(0.5)
    assert lr_multiplier(5, 2.0, timed) == 1.0


def test_accumulation_keeps_global_batch():
    cfg = TrainConfig(seq_len=16, batch_tokens=256, micro_batch_tokens=64, max_steps=1)
    assert accumulation_steps(cfg, 1) == (4, 64)
    assert accumulation_steps(cfg, 2) == (2, 64)
    assert accumulation_steps(cfg, 4) == (1, 64)
    assert accumulation_steps(replace(cfg, micro_batch_tokens=1024), 2) == (1, 128)  # a cap, not a demand
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        accumulation_steps(replace(cfg, micro_batch_tokens=48), 1)


def test_gradient_accumulation_matches_full_batch(train_shard):
    results = []
    for micro in (None, 64):
        model, tcfg = debug_setup()
        tcfg = replace(tcfg, max_steps=3, micro_batch_tokens=micro, val_every=0)
        loader = TokenLoader([train_shard], tcfg.seq_len, seed=0)
        train(model, loader, tcfg, device=torch.device("cpu"), progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_training_lowers_loss_and_logs(train_shard, tmp_path):
    model, tcfg = debug_setup()
    tcfg = replace(tcfg, max_steps=30, val_every=10)
    loader = TokenLoader([train_shard], tcfg.seq_len, seed=0)
    calls = []

    def validate(m):
        calls.append(m.training)
        return {"val_loss": 1.0, "val_bpb": 2.0}

    log = tmp_path / "log.jsonl"
    r = train(model, loader, tcfg, device=torch.device("cpu"), log_path=log, validate=validate, progress=False)
    assert r.steps == 30 and r.train_tokens == 30 * tcfg.batch_tokens
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.3
    assert len(calls) == 3 and len(r.val_history) == 3
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [rec["step"] for rec in records if rec["event"] == "val"] == [10, 20, 30]


def test_time_budget_stops_training(train_shard):
    model, tcfg = debug_setup()
    tcfg = replace(tcfg, max_steps=None, time_budget=0.5)
    r = train(model, TokenLoader([train_shard], tcfg.seq_len), tcfg, device=torch.device("cpu"), progress=False)
    assert r.steps >= 1 and 0.5 <= r.train_seconds < 5.0


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_loss_first_steps(train_shard, case):
    """A fixed-seed loss curve on CPU: catches refactors that silently change numbers, for the
    vanilla debug model and a looped one with LoRA, per-layer controls and depth embeddings.
    Regenerate (only for an intended change) with LOOPGOLF_REGEN_GOLDEN=1."""
    import os

    changes, path = GOLDEN_CASES[case]
    model, tcfg = debug_setup(seed=1234, **changes)
    if changes:
        assert model.plan.num_virtual == 4 and any(n.startswith("lora.") for n, _ in model.named_parameters())
    tcfg = replace(tcfg, max_steps=6, val_every=0)
    r = train(model, TokenLoader([train_shard], tcfg.seq_len, seed=7), tcfg, device=torch.device("cpu"), progress=False)
    if os.environ.get("LOOPGOLF_REGEN_GOLDEN"):
        path.write_text(json.dumps({"preset": "debug", "vocab_size": 64, "model_changes": changes, "losses": r.losses}, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert golden.get("model_changes", {}) == changes
    assert r.losses == pytest.approx(golden["losses"], rel=2e-4, abs=2e-4)
