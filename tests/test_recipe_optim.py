"""The Parameter Golf record's optimizer and schedule options: Polar-Express Newton-Schulz
coefficients for Muon (``optim.muon_ns``), a floor under the warmdown (``train.min_lr_frac``) and
a moving average of the weights that is what a run scores and exports (``train.ema_decay``).
Each is off by default, and off changes nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from helpers import RECORD_MODEL_FIELDS, markov_tokens, one_line_error, tiny_config

from loopgolf.cli import main
from loopgolf.config import MUON_NS_SCHEDULES, OptimizerConfig, RunConfig, TrainConfig, get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.run import RunOptions, build_config
from loopgolf.train import steptime
from loopgolf.train.checkpoint import CheckpointPolicy, check_resumable, read_checkpoint, restore_ema
from loopgolf.train.ema import WeightEMA, exported_state
from loopgolf.train.optim import NS_COEFFS, NS_SCHEDULES, POLAR_EXPRESS_COEFFS, Muon, build_optimizers, newton_schulz
from loopgolf.train.trainer import lr_multiplier, run_step, train, training_progress
from loopgolf.util import read_jsonl

CPU = torch.device("cpu")
# The record's tuples (openai/parameter-golf PR #1344, carried into #1787 and the current record),
# written out again here so that a typo in the library's copy fails.
PE_TUPLES = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The record's options on the debug preset's 8 steps; the floor is raised from the record's 0.1 so
# that it binds before the last step (the warmdown reaches 0.147 there).
RECIPE_TRAIN = [
    *("--train", "ema_decay=0.9", "--train", "min_lr_frac=0.2", "--train", "warmdown_frac=0.85"),
    *("--train", "grad_clip=0.3", "--train", "optim.muon_ns=polar_express"),
]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(30_000, vocab=64, seed=9))
    return path


def debug_setup(seed: int = 1337, **train_changes) -> tuple[GPT, TrainConfig]:
    preset = get_preset("debug")
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": 64}))
    return model, replace(preset.train, val_every=0, **train_changes)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ Polar Express


def reference_iteration(g: torch.Tensor, tuples, eps: float = 1e-7) -> torch.Tensor:
    """The iteration from its definition, in float64: X = G / (||G||_F + eps), on the wide side,
    then X <- a X + b (X X^T) X + c (X X^T)^2 X for each (a, b, c) in turn."""
    x = g.double()
    x = x / (x.norm() + eps)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for a, b, c in tuples:
        gram = x @ x.T
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.T if tall else x


def old_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """loopgolf's function before the schedules, verbatim."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def test_polar_express_applies_each_tuple_in_turn_then_repeats_the_last():
    assert POLAR_EXPRESS_COEFFS == PE_TUPLES and NS_SCHEDULES["polar_express"] == PE_TUPLES
    assert tuple(NS_SCHEDULES) == MUON_NS_SCHEDULES  # the config's list of names is the optimizer's
    gen = torch.Generator().manual_seed(0)
    for shape in ((6, 4), (4, 6), (5, 5)):
        g = torch.randn(*shape, generator=gen)
        for steps in range(1, 8):
            want = reference_iteration(g, [PE_TUPLES[min(i, 4)] for i in range(steps)])
            got = newton_schulz(g, steps=steps, schedule=POLAR_EXPRESS_COEFFS)
            assert got.shape == g.shape and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=f"{shape}, {steps} steps")
        # One step of each tuple on its own is not the standard step: the schedule is really used.
        assert not torch.allclose(newton_schulz(g, steps=1, schedule=POLAR_EXPRESS_COEFFS), newton_schulz(g, steps=1))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_polar_express_ends_closer_to_orthogonal_after_5_steps(shape):
    # Measured: the standard tuple leaves singular values in about [0.68, 1.13] after 5 steps,
    # Polar Express in about [0.86, 1.14] (worst distance from 1: 0.32 vs 0.14).
    for seed in range(4):
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        worst = {}
        for name, schedule in NS_SCHEDULES.items():
            s = torch.linalg.svdvals(newton_schulz(g, steps=5, schedule=schedule))
            worst[name] = float((s - 1).abs().max())
        assert worst["polar_express"] < 0.2 < 0.3 < worst["standard"], worst
        assert worst["polar_express"] < 0.5 * worst["standard"], worst


def test_standard_schedule_is_bit_for_bit_the_old_function():
    assert NS_SCHEDULES["standard"] == (NS_COEFFS,) == ((3.4445, -4.7750, 2.0315),)
    gen = torch.Generator().manual_seed(1)
    for shape in ((32, 64), (64, 32), (17, 17)):
        g = torch.randn(*shape, generator=gen)
        for steps in (1, 5, 8):
            assert torch.equal(newton_schulz(g, steps=steps), old_newton_schulz(g, steps=steps))
            assert torch.equal(newton_schulz(g, steps=steps, schedule=NS_SCHEDULES["standard"]), old_newton_schulz(g, steps=steps))


def test_muon_step_uses_the_configured_schedule():
    def one_step(muon_ns: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT(tiny_config(plan=PlanSpec("vanilla", layers=1)))
        before = params_of(model)
        [muon] = [o for o in build_optimizers(model, OptimizerConfig(muon_ns=muon_ns), tied=True) if isinstance(o, Muon)]
        grads = {}
        gen = torch.Generator().manual_seed(1)
        names = {id(p): n for n, p in model.named_parameters()}
        for group in muon.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=gen)
                grads[names[id(p)]] = p.grad.clone()
        muon.step()
        return before, grads, {n: params_of(model)[n] for n in grads}

    cfg = OptimizerConfig()
    for name, schedule in NS_SCHEDULES.items():
        before, grads, after = one_step(name)
        for n, g in grads.items():
            # First step: the momentum buffer is the gradient; Nesterov adds momentum x buffer.
            update = newton_schulz(g + cfg.muon_momentum * g, steps=cfg.muon_backend_steps, schedule=schedule)
            update = update * max(1.0, g.size(0) / g.size(1)) ** 0.5
            torch.testing.assert_close(after[n], before[n] - cfg.matrix_lr * update, rtol=0, atol=1e-7, msg=f"{name}: {n}")
    assert any(not torch.equal(a, b) for a, b in zip(one_step("standard")[2].values(), one_step("polar_express")[2].values()))


# ------------------------------------------------------------------------- MIN_LR


def old_lr_multiplier(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """The schedule before ``min_lr_frac``, verbatim."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.warmdown_frac <= 0:
        return warm
    return warm * max(0.0, min(1.0, (1.0 - training_progress(step, elapsed, cfg)) / cfg.warmdown_frac))


SCHEDULES = [
    dict(max_steps=100, time_budget=None, warmdown_frac=0.2),
    dict(max_steps=100, time_budget=None, warmdown_frac=0.5, warmup_steps=10),
    dict(max_steps=None, time_budget=10.0, warmdown_frac=0.3),
    dict(max_steps=100, time_budget=None, warmdown_frac=0.0, warmup_steps=5),
    dict(max_steps=100, time_budget=None, warmdown_frac=1.0),
]


@pytest.mark.parametrize("kw", SCHEDULES)
def test_lr_floor_zero_is_the_old_schedule(kw):
    cfg = TrainConfig(seq_len=8, batch_tokens=64, **kw)
    assert cfg.min_lr_frac == 0.0
    for step in range(0, 111):
        elapsed = step / 10
        assert lr_multiplier(step, elapsed, cfg) == old_lr_multiplier(step, elapsed, cfg), step


@pytest.mark.parametrize("kw", SCHEDULES)
def test_lr_floor_holds_through_the_warmdown(kw):
    floor = 0.1
    cfg = TrainConfig(seq_len=8, batch_tokens=64, min_lr_frac=floor, **kw)
    old = replace(cfg, min_lr_frac=0.0)
    for step in range(0, 111):
        elapsed = step / 10
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        got = lr_multiplier(step, elapsed, cfg)
        # warm x max(floor, decay): the floor caps the decay, the warmup still scales it.
        assert got == pytest.approx(warm * max(floor, old_lr_multiplier(step, elapsed, old) / warm)), step
        if cfg.warmdown_frac > 0 and training_progress(step, elapsed, cfg) >= 1.0 - cfg.warmdown_frac:
            assert got >= warm * floor - 1e-12, step
    if kw["warmdown_frac"] > 0:
        assert lr_multiplier(100, 10.0, cfg) == pytest.approx(floor)  # the end of the budget: the floor, not 0
        assert lr_multiplier(100, 10.0, old) == 0.0


def test_lr_warmup_still_ramps_under_a_floor():
    cfg = TrainConfig(seq_len=8, batch_tokens=64, max_steps=100, time_budget=None, warmup_steps=10, warmdown_frac=0.2, min_lr_frac=0.5)
    assert [lr_multiplier(s, 0.0, cfg) for s in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert lr_multiplier(95, 0.0, cfg) == pytest.approx(0.5)  # decay 0.25 is under the floor


def test_training_uses_the_floored_multiplier(shard):
    model, tcfg = debug_setup(max_steps=4, warmdown_frac=1.0, min_lr_frac=0.3)
    log = shard.parent / "floor.jsonl"
    train(model, TokenLoader([shard], tcfg.seq_len, seed=0), tcfg, device=CPU, log_path=log, progress=False)
    assert [r["lr_mul"] for r in read_jsonl(log) if r["event"] == "train"] == pytest.approx([1.0, 0.75, 0.5, 0.3])


# ----------------------------------------------------------------------- grad_clip


def test_grad_clip_at_the_records_value_bounds_the_update_norm():
    class NormRecorder:
        """Stands in for the optimizers: records the gradient norm each step sees."""

        def __init__(self, model: torch.nn.Module) -> None:
            self.model, self.norms = model, []

        def step(self) -> None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    torch.manual_seed(0)
    model = GPT(tiny_config(plan=PlanSpec("vanilla", layers=2)))
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randint(0, 64, (4, 16), generator=gen), torch.randint(0, 64, (4, 16), generator=gen)
    norms = {}
    for clip in (0.0, 0.3):
        rec = NormRecorder(model)
        run_step(model, model, [rec], xs, ys, accum=2, amp=nullcontext(), world_size=1, grad_clip=clip, device=CPU)
        norms[clip] = rec.norms[0]
    assert norms[0.0] > 0.5  # the unclipped gradient is larger, so the clip is doing something
    assert norms[0.3] == pytest.approx(0.3, rel=1e-4)


# ---------------------------------------------------------------------------- EMA


def test_ema_is_the_hand_computed_average_and_is_what_training_leaves(shard):
    decay = 0.8
    # The trajectory, from a run without the average: the start, then the weights after each step.
    model, tcfg = debug_setup(max_steps=5)
    trajectory = []
    live = train(
        model,
        TokenLoader([shard], tcfg.seq_len, seed=1),
        tcfg,
        device=CPU,
        on_step=lambda step, progress, m: trajectory.append(params_of(m)),
        progress=False,
    )
    trajectory.append(params_of(model))
    assert len(trajectory) == 6

    model, tcfg = debug_setup(max_steps=5, ema_decay=decay)
    log = shard.parent / "ema.jsonl"
    averaged = train(model, TokenLoader([shard], tcfg.seq_len, seed=1), tcfg, device=CPU, log_path=log, progress=False)
    assert averaged.losses == live.losses  # the average never touches training

    want = {n: t.double() for n, t in trajectory[0].items()}
    for snapshot in trajectory[1:]:
        want = {n: decay * want[n] + (1 - decay) * snapshot[n].double() for n in want}
    got = params_of(model)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.allclose(got[n], trajectory[-1][n]) for n in got)  # not the last weights
    [event] = [r for r in read_jsonl(log) if r["event"] == "ema"]
    assert event["step"] == 5 and event["decay"] == decay


def test_ema_off_builds_no_average_and_checkpoints_as_before(shard, tmp_path, monkeypatch):
    import loopgolf.train.trainer as trainer

    def refuse(*a, **k):
        raise AssertionError("an average was built with ema_decay unset")

    monkeypatch.setattr(trainer, "WeightEMA", refuse)
    model, tcfg = debug_setup(max_steps=2)
    assert (tcfg.ema_decay, tcfg.min_lr_frac, tcfg.optim.muon_ns) == (None, 0.0, "standard")
    train(model, TokenLoader([shard], tcfg.seq_len), tcfg, device=CPU, progress=False, checkpoint=CheckpointPolicy(tmp_path / "c.pt"))
    assert set(read_checkpoint(tmp_path / "c.pt")) == {"format", "model", "optimizers", "loader", "rng", "train", "config", "hook"}
    [muon] = [o for o in build_optimizers(model, tcfg.optim, tied=True) if isinstance(o, Muon)]
    assert set(muon.state_dict()["param_groups"][0]) == {"params", "lr", "momentum", "backend_steps", "nesterov", "initial_lr"}


def staged_setup(seed: int) -> tuple[GPT, TrainConfig]:
    """Progressive recurrence, gradient accumulation and all three options on: a resume must
    bring back the averages with the rest."""
    cfg = tiny_config(num_heads=2, num_kv_heads=1, per_layer_controls=True, plan=PlanSpec("mini-loop", layers=3, loops=1, loop_start=1, loop_end=1))
    torch.manual_seed(seed)
    tcfg = replace(
        get_preset("debug").train,
        max_steps=10,
        micro_batch_tokens=128,
        recurrence_stages=[0.45],
        val_every=0,
        ema_decay=0.7,
        min_lr_frac=0.2,
        optim=OptimizerConfig(muon_momentum_warmup_steps=4, muon_ns="polar_express"),
    )
    return GPT(cfg), tcfg


class Killed(Exception):
    pass


def test_resume_with_ema_repeats_the_uninterrupted_run(shard, tmp_path):
    def run(model, tcfg, **kw):
        return train(model, TokenLoader([shard], tcfg.seq_len, seed=3), tcfg, device=CPU, progress=False, **kw)

    model, tcfg = staged_setup(seed=11)
    config = {"model": model.config.to_dict(), "train": asdict(tcfg)}
    full = run(model, tcfg)
    full_params = params_of(model)

    model, tcfg = staged_setup(seed=11)
    policy = CheckpointPolicy(tmp_path / "checkpoint.pt", every=4, config=config)

    def die(step, progress, m):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        run(model, tcfg, checkpoint=policy, on_step=die)
    ckpt = read_checkpoint(policy.path)
    assert ckpt["train"]["step"] == 4 and set(ckpt["ema"]) == set(full_params)

    model, tcfg = staged_setup(seed=999)  # everything must come from the checkpoint
    resumed = run(model, tcfg, checkpoint=policy, resume=ckpt)
    assert resumed.losses == full.losses and resumed.stage_steps == full.stage_steps == [0, 5]
    for n, p in params_of(model).items():
        assert torch.equal(p, full_params[n]), n  # bit-for-bit on CPU, averages included

    # The final checkpoint keeps the live weights (a resume trains on from them) beside the
    # averages, and what it exports is the averages.
    final = read_checkpoint(policy.path)
    assert final["train"]["step"] == 10
    assert any(not torch.equal(final["model"][n], full_params[n]) for n in full_params)
    for n in full_params:
        assert torch.equal(final["ema"][n], full_params[n]) and torch.equal(exported_state(final)[n], full_params[n])

    # Resuming the finished run (`loopgolf run --resume DIR` after `loopgolf train`) trains no
    # step and hands on the averages.
    model, tcfg = staged_setup(seed=5)
    again = run(model, tcfg, checkpoint=policy, resume=final)
    assert again.steps == 10
    for n, p in params_of(model).items():
        assert torch.equal(p, full_params[n]), n

    from loopgolf.sources.open import open_model

    opened = open_model(policy.path)  # `loopgolf eval checkpoint.pt` scores what the run exports
    for n, p in params_of(opened.model).items():
        assert torch.equal(p, full_params[n]), n


def test_checkpoints_from_before_the_options_still_resume(shard, tmp_path):
    model, tcfg = debug_setup(max_steps=2)
    policy = CheckpointPolicy(tmp_path / "c.pt", config={"model": model.config.to_dict(), "train": asdict(tcfg)})
    train(model, TokenLoader([shard], tcfg.seq_len), tcfg, device=CPU, progress=False, checkpoint=policy)
    ckpt = read_checkpoint(policy.path)
    old = json.loads(json.dumps(ckpt["config"]["train"]))  # as an older loopgolf wrote it
    for key in ("min_lr_frac", "ema_decay"):
        del old[key]
    del old["optim"]["muon_ns"]
    ckpt["config"]["train"] = old
    check_resumable(ckpt, model.config.to_dict(), asdict(tcfg))  # missing fields mean their defaults
    for changed, field in ((replace(tcfg, ema_decay=0.9), "ema_decay"), (replace(tcfg, optim=OptimizerConfig(muon_ns="polar_express")), "optim")):
        with pytest.raises(ValueError, match=field):
            check_resumable(ckpt, model.config.to_dict(), asdict(changed))
    with pytest.raises(ValueError, match="holds no weight averages"):
        restore_ema(ckpt, WeightEMA(model, 0.9))

    # A config.json written before the fields reads with their defaults.
    fresh = RunConfig.from_preset(get_preset("debug"))
    stored = fresh.to_dict()
    for key in ("min_lr_frac", "ema_decay"):
        del stored["train"][key]
    del stored["train"]["optim"]["muon_ns"]
    assert RunConfig.from_dict(stored) == fresh


def test_ema_state_is_strict_and_exported_state_keeps_dtypes():
    torch.manual_seed(0)
    model = GPT(tiny_config(plan=PlanSpec("vanilla", layers=1)))
    ema = WeightEMA(model, 0.5)
    state = ema.state_dict()
    assert all(t.dtype == torch.float32 for t in state.values()) and set(state) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict(dict(list(state.items())[1:]))
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**state, name: torch.zeros(3)})
    ckpt = {"model": {name: torch.zeros(state[name].shape, dtype=torch.bfloat16), "other": torch.ones(2)}, "ema": {name: torch.full(state[name].shape, 0.5)}}
    out = exported_state(ckpt)
    assert out[name].dtype == torch.bfloat16 and bool((out[name] == 0.5).all()) and torch.equal(out["other"], torch.ones(2))
    assert exported_state({"model": ckpt["model"]}) == ckpt["model"]


# ------------------------------------------------------------------- step time key


def old_cache_key(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, steps: int) -> str:
    """steptime.cache_key before the options, verbatim (with the optimizer as it was)."""
    train = asdict(train_cfg)
    new_optim = ("muon_ns", "muon_weight_decay", "muon_row_normalize", "embed_weight_decay", "adam_weight_decay")
    train["optim"] = {k: v for k, v in train["optim"].items() if k not in new_optim}
    shape = {k: train[k] for k in ("seq_len", "batch_tokens", "micro_batch_tokens", "optim", "grad_clip", "recurrence_stages", "compile")}
    new_model = RECORD_MODEL_FIELDS
    blob = {
        "format": steptime.STEPTIME_FORMAT,
        "model": {k: v for k, v in model_cfg.to_dict().items() if k not in new_model},
        "train": shape,
        "device": steptime.device_key(device),
        "torch": torch.__version__,
        "steps": steps,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


def test_step_time_key_and_measurement_follow_the_options(monkeypatch):
    preset = get_preset("debug")
    model_cfg, base = preset.model, preset.train

    def key(cfg: TrainConfig) -> str:
        return steptime.cache_key(model_cfg, cfg, CPU, 2)

    assert key(base) == old_cache_key(model_cfg, base, CPU, 2)  # entries measured before the options stay valid
    assert key(replace(base, optim=OptimizerConfig(muon_ns="polar_express"))) != key(base)
    assert key(replace(base, ema_decay=0.9)) != key(base)
    assert key(replace(base, ema_decay=0.9)) == key(replace(base, ema_decay=0.99))  # the decay does not change the time
    assert key(replace(base, min_lr_frac=0.1)) == key(base)  # nor does the schedule
    assert key(replace(base, optim=OptimizerConfig(muon_weight_decay=0.1))) != key(base)
    xsa = ModelConfig.from_dict({**model_cfg.to_dict(), "xsa": True})
    assert steptime.cache_key(xsa, base, CPU, 2) != key(base)  # a new model option re-measures

    updates = []
    monkeypatch.setattr(WeightEMA, "update", lambda self: updates.append(self.decay))
    small = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": 64})
    [t] = steptime.measure(small, replace(base, ema_decay=0.9), CPU, steps=2, warmup=1)
    assert t > 0 and updates == [0.9] * 3  # the average's update is part of every measured step


# -------------------------------------------------------------------- bad values


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(seq_len=8, batch_tokens=64, max_steps=1, **kw)


@pytest.mark.parametrize(
    "build,words",
    [
        (lambda: OptimizerConfig(muon_ns="cubic"), ["muon_ns", "standard, polar_express", "'cubic'"]),
        (lambda: OptimizerConfig(muon_ns=5), ["muon_ns", "str"]),
        (lambda: _train_cfg(min_lr_frac=-0.1), ["min_lr_frac", "[0.0, 1.0]"]),
        (lambda: _train_cfg(min_lr_frac=1.5), ["min_lr_frac", "[0.0, 1.0]"]),
        (lambda: _train_cfg(min_lr_frac=math.nan), ["min_lr_frac", "finite"]),
        (lambda: _train_cfg(ema_decay=0), ["ema_decay", "(0, 1)"]),
        (lambda: _train_cfg(ema_decay=1.0), ["ema_decay", "(0, 1)"]),
        (lambda: _train_cfg(ema_decay=1.5), ["ema_decay", "(0, 1)"]),
        (lambda: _train_cfg(ema_decay=-0.5), ["ema_decay", "(0, 1)"]),
        (lambda: _train_cfg(ema_decay=math.nan), ["ema_decay", "finite"]),
        (lambda: _train_cfg(ema_decay="0.99"), ["ema_decay", "float or null"]),
        (lambda: WeightEMA(GPT(tiny_config()), 1.0), ["decay", "(0, 1)"]),
    ],
)
def test_bad_values_are_one_line_value_errors(build, words):
    with pytest.raises(ValueError) as e:
        build()
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--train", "optim.muon_ns=cubic"], "muon_ns"),
        (["--train", 'optim={"muon_ns": "cubic"}'], "muon_ns"),
        (["--train", "min_lr_frac=-0.1"], "min_lr_frac"),
        (["--train", "min_lr_frac=1.5"], "min_lr_frac"),
        (["--train", "min_lr_frac=NaN"], "min_lr_frac"),
        (["--train", "ema_decay=0"], "ema_decay"),
        (["--train", "ema_decay=1"], "ema_decay"),
        (["--train", "ema_decay=1.5"], "ema_decay"),
        (["--train", "ema_decay=NaN"], "ema_decay"),
        (["--train", "ema_decay=fast"], "ema_decay"),
    ],
)
def test_bad_values_on_the_command_line_exit_2_in_one_line(extra, word, tmp_path, capsys):
    # Checked when the configuration is built, before the data is opened: no dataset needed.
    out = tmp_path / "run"
    code = main(["run", "--preset", "debug", "--data", str(tmp_path / "no-data"), "--out", str(out), "--quiet", *extra])
    one_line_error(code, capsys.readouterr().err, word)
    assert not out.exists()


def test_options_set_through_the_command_line_syntaxes():
    record = {"ema_decay": 0.9965, "min_lr_frac": 0.1, "grad_clip": 0.3}
    for optim in ({"optim": {"muon_ns": "polar_express"}}, {"optim.muon_ns": "polar_express"}):
        cfg = build_config(RunOptions(preset="debug", train_overrides={**record, **optim})).train
        assert (cfg.ema_decay, cfg.min_lr_frac, cfg.grad_clip, cfg.optim.muon_ns) == (0.9965, 0.1, 0.3, "polar_express")
        assert cfg.optim.matrix_lr == get_preset("debug").train.optim.matrix_lr  # the other optimizer fields stay
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert all(fields[n].metadata.get("added_later") for n in ("min_lr_frac", "ema_decay"))


# ------------------------------------------------------------- a whole run, its script


@pytest.fixture(scope="module")
def record_run(text_dataset, tmp_path_factory):
    """`loopgolf run` with the record's options (and a checkpoint), with what the run handed to
    the exporter captured."""
    import loopgolf.run as run_module

    out = tmp_path_factory.mktemp("record") / "run"
    exported = {}
    real = run_module.export_model

    def capture(model, *a, **kw):
        exported.update(params_of(model))
        return real(model, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "export_model", capture)
        assert (
            main(
                ["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(out), "--seed", "3", "--quiet", "--checkpoint-every", "4", *RECIPE_TRAIN]
            )
            == 0
        )
    return out, exported


def test_a_run_with_the_record_options_exports_the_average(record_run):
    from loopgolf.sources.load import load_source
    from loopgolf.sources.open import open_model

    out, exported = record_run
    train_cfg = json.loads((out / "config.json").read_text())["train"]
    assert (train_cfg["ema_decay"], train_cfg["min_lr_frac"], train_cfg["grad_clip"], train_cfg["optim"]["muon_ns"]) == (0.9, 0.2, 0.3, "polar_express")
    ckpt = read_checkpoint(out)
    assert ckpt["train"]["step"] == 8 and exported.keys() == ckpt["ema"].keys()
    for n, t in exported.items():
        assert torch.equal(t, ckpt["ema"][n]), n
    assert any(not torch.equal(exported[n], ckpt["model"][n]) for n in exported)
    events = [r["event"] for r in read_jsonl(out / "log.jsonl")]
    assert events.index("ema") < events.index("eval_pre") < events.index("export")
    lr = [r["lr_mul"] for r in read_jsonl(out / "log.jsonl") if r["event"] == "train"]
    assert lr == pytest.approx([max(0.2, min(1.0, (1 - step / 8) / 0.85)) for step in range(8)]) and lr[-1] == 0.2
    # Reading the run's checkpoint as a model (eval, convert, --init-from) gives the average too.
    source = load_source(out)
    opened = open_model(out / "checkpoint.pt")
    for n, t in exported.items():
        assert torch.equal(source.state[n], t) and torch.equal(dict(opened.model.named_parameters())[n], t), n


@pytest.mark.slow
def test_generated_script_reproduces_a_run_with_the_record_options(record_run, text_dataset, tmp_path):
    from test_submission import assert_reproduces, run_script

    from loopgolf.codebytes import render_script
    from loopgolf.data.stats import find_tokenizer
    from loopgolf.rundir import RunDir

    out, _ = record_run
    script = tmp_path / "train_gpt.py"
    script.write_text(render_script(RunDir(out).read_config()), encoding="utf-8")
    proc = run_script(script, tmp_path, tmp_path / "out", DATA_PATH=str(text_dataset), TOKENIZER_PATH=str(find_tokenizer(text_dataset)))
    assert proc.returncode == 0, proc.stderr
    assert_reproduces(out, tmp_path / "out")
    assert any(r["event"] == "ema" for r in read_jsonl(tmp_path / "out" / "log.jsonl"))


@pytest.mark.slow
def test_two_gloo_ranks_keep_the_same_average_as_one_process(text_dataset, tmp_path):
    # Every rank keeps its own average of identical weights; rank 0's checkpoint holds it.
    from test_distributed import launch

    args = ["train", "--preset", "debug", "--data", str(text_dataset), "--steps", "4", "--seed", "2", "--quiet", *RECIPE_TRAIN]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    launch(2, [*args, "--out", str(tmp_path / "two")])
    one, two = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert one["ema"].keys() == two["ema"].keys() and 0 < len(one["ema"]) and one["ema"].keys() <= one["model"].keys()
    for name, t in one["ema"].items():
        torch.testing.assert_close(two["ema"][name], t, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(t, one["model"][name]) for name, t in one["ema"].items())  # averages, not the live weights


# ------------------------------------------------------------------ weight decay, row normalisation


def _muon_step(p0: torch.Tensor, grad: torch.Tensor, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(p0.clone())
    p.grad = grad.clone()
    Muon([p], lr=0.1, momentum=0.0, nesterov=False, **kw).step()
    return p.detach()


def test_muon_weight_decay_is_decoupled_and_scaled_by_the_lr():
    torch.manual_seed(0)
    p0, grad = torch.randn(16, 8), torch.randn(16, 8)
    plain = _muon_step(p0, grad)
    decayed = _muon_step(p0, grad, weight_decay=0.5)
    # w <- w * (1 - lr * wd) - lr * update: the update is the one without decay
    assert torch.allclose(decayed, p0 * (1 - 0.1 * 0.5) + (plain - p0), atol=1e-6)


def test_muon_row_normalize_orthogonalises_the_row_normalised_update():
    torch.manual_seed(1)
    p0, grad = torch.randn(16, 8), torch.randn(16, 8) * torch.logspace(-2, 2, 16)[:, None]
    got = _muon_step(p0, grad, row_normalize=True)
    unit_rows = grad / grad.norm(dim=-1, keepdim=True)
    want = p0 - 0.1 * newton_schulz(unit_rows) * max(1.0, 16 / 8) ** 0.5
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, _muon_step(p0, grad), atol=1e-3)  # it changes the update


def test_adam_weight_decay_switches_to_adamw_per_group_and_zero_keeps_adam():
    model = GPT(tiny_config(plan=PlanSpec("vanilla", layers=2)))
    plain = build_optimizers(model, OptimizerConfig(), tied=True)[0]
    assert type(plain) is torch.optim.Adam
    opt = build_optimizers(model, OptimizerConfig(embed_weight_decay=0.085, adam_weight_decay=0.02), tied=True)[0]
    assert type(opt) is torch.optim.AdamW
    embed = model.tok_emb.weight
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(embed)] == 0.085
    assert {by_param[id(p)] for n, p in model.named_parameters() if n in ("attn_scale", "q_gain", "skip_weight")} == {0.02}
    muon = build_optimizers(model, OptimizerConfig(muon_weight_decay=0.095, muon_row_normalize=True), tied=True)[1]
    assert (muon.weight_decay, muon.row_normalize) == (0.095, True)


@pytest.mark.parametrize("field_name", ["muon_weight_decay", "embed_weight_decay", "adam_weight_decay"])
@pytest.mark.parametrize("value", [-0.1, float("nan"), 11.0, "a lot"])
def test_bad_weight_decays_are_one_line_errors(field_name, value):
    with pytest.raises(ValueError, match=field_name) as e:
        OptimizerConfig(**{field_name: value})
    assert "\n" not in str(e.value)
