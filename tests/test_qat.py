from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from helpers import markov_tokens, tiny_config
from torch._dynamo.utils import counters

from loopgolf.config import get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.export.pack import export_model, load_model
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.train.checkpoint import CheckpointPolicy, read_checkpoint
from loopgolf.train.optim import build_optimizers
from loopgolf.train.qat import QAT, QATConfig, QATError, qat_targets, row_step
from loopgolf.train.trainer import compile_model, run_step, train, warm_up_compiled


def looped_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = tiny_config(num_heads=2, num_kv_heads=1, plan=PlanSpec("cycle", layers=2, loops=3), lora_ranks={"q": 2})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def reference_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    s = (w.abs().amax(dim=1, keepdim=True) / qmax).half().float()
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


def test_targets_are_shared_block_matrices_only():
    model = looped_model()
    names = [n for n, _, _ in qat_targets(model, float_max_numel=0)]
    assert names == [f"attn.{i}.{p}.weight" for i in range(2) for p in ("c_q", "c_k", "c_v", "proj")] + [
        f"mlps.{i}.{p}.weight" for i in range(2) for p in ("fc", "proj")
    ]
    # Tensors the exporter keeps as floats are not fake-quantized.
    assert [n for n, _, _ in qat_targets(model, float_max_numel=1024)] == ["mlps.0.fc.weight", "mlps.0.proj.weight", "mlps.1.fc.weight", "mlps.1.proj.weight"]


def quantized_copy(model: GPT, bits: int) -> GPT:
    ref = looped_model()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _, w, _ in qat_targets(ref, 0):
            w.copy_(reference_fake_quant(w, bits))
    return ref


@pytest.mark.parametrize("bits", [6, 4])
def test_ste_forward_is_the_quantized_weight_and_gradient_passes_straight(bits):
    model = looped_model()
    qat = QAT(model, QATConfig(mode="ste", bits=bits, float_max_numel=0, start_frac=0.5))
    assert qat.weights == 12
    x = torch.randint(0, 64, (2, 8))
    # Before start_frac the QAT forward is the plain forward, bit for bit.
    assert torch.equal(qat.forward(x, x), model(x, x))
    keys = list(model.state_dict())
    qat(3, 0.5, model)
    assert qat.start_step == 3 and list(model.state_dict()) == keys  # the model stays plain
    qat.forward(x, x).backward()
    w = model.attn[0].c_q.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    # The loss is the quantized model's; straight through: d(loss)/dw equals d(loss)/d(quantized w).
    ref = quantized_copy(model, bits)
    loss = ref(x, x)
    torch.testing.assert_close(qat.forward(x, x), loss, rtol=0, atol=0)
    loss.backward()
    torch.testing.assert_close(w.grad, ref.attn[0].c_q.weight.grad)


def test_each_stored_matrix_is_quantized_once_per_forward(monkeypatch):
    """12 stored matrices run by 3 loops: 12 quantizations per forward, not 36."""
    import loopgolf.train.qat as qat_module

    calls = []
    original = qat_module.fake_quantize
    monkeypatch.setattr(qat_module, "fake_quantize", lambda w, qmax: calls.append(w.shape) or original(w, qmax))
    model = looped_model()
    assert model.plan.num_virtual == 6 and model.plan.num_attn == 2
    qat = QAT(model, QATConfig(mode="ste", bits=6, float_max_numel=0, start_frac=0.0))
    qat(0, 0.0, model)
    x = torch.randint(0, 64, (2, 8))
    qat.forward(x, x)
    assert len(calls) == 12


def test_switching_qat_on_does_not_recompile():
    """The transform is in the graph from step 0 behind a 0/1 tensor: switching QAT on mid-run
    reuses the graph compiled before the clock (eager backend: guards like inductor)."""
    torch._dynamo.reset()
    model = looped_model()
    qat = QAT(model, QATConfig(mode="noise", bits=6, float_max_numel=0, start_frac=0.5))
    step_fn = compile_model(qat.forward, backend="eager")
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = counters["stats"]["unique_graphs"]
    warm_up_compiled(step_fn, model, [None], x, nullcontext())
    assert counters["stats"]["unique_graphs"] - before == 1
    optimizers = build_optimizers(model, get_preset("debug").train.optim, tied=True)
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(4):
            qat(step, step / 4, model)
            xs = torch.cat([x, x.flip(0)])
            losses.append(
                run_step(
                    step_fn, model, optimizers, xs, xs.roll(1, dims=1), accum=2, amp=nullcontext(), world_size=1, grad_clip=1.0, device=torch.device("cpu")
                )
            )
    assert qat.start_step == 2 and all(torch.isfinite(loss) for loss in losses)
    torch._dynamo.reset()


def test_noise_is_one_step_wide_fixed_within_a_step_and_resampled():
    model = looped_model()
    qat = QAT(model, QATConfig(mode="noise", bits=6, float_max_numel=0, seed=1, start_frac=0.0))
    qat(0, 0.0, model)
    name = "mlps.1.fc.weight"
    w = dict(model.named_parameters())[name].detach()
    a, b = qat.transformed_weights()[name].detach(), qat.transformed_weights()[name].detach()
    assert torch.equal(a, b)  # every loop over the block sees the same perturbation
    step = row_step(w, 31)
    assert bool(((a - w).abs() <= step / 2 + 1e-7).all()) and float((a - w).abs().max()) > 0.3 * float(step.max())
    qat(1, 0.1, model)  # the hook draws fresh noise before every optimizer step
    assert not torch.equal(qat.transformed_weights()[name].detach(), a)


def test_the_run_seeds_the_noise():
    from loopgolf.export.quantize import QuantPolicy
    from loopgolf.run import build_qat

    draws = []
    for seed in (1, 1, 2):
        model = looped_model()
        qat = build_qat(model, {"mode": "noise", "start_frac": 0.0}, QuantPolicy(float_max_numel=0), seed=seed)
        qat(0, 0.0, model)
        draws.append(qat.units[0].clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert build_qat(looped_model(), {"mode": "off", "start_frac": 0.5}, QuantPolicy(), seed=0) is None


def test_bad_configs():
    with pytest.raises(QATError, match="mode"):
        QATConfig(mode="int6")
    with pytest.raises(QATError, match="start_frac"):
        QATConfig(start_frac=1.5)
    with pytest.raises(QATError, match="bits"):
        QATConfig(bits=9)
    with pytest.raises(QATError, match="role_bits"):
        QATConfig(role_bits={"embed": 6})
    with pytest.raises(QATError, match="unknown QAT field"):
        QATConfig.from_dict({"mode": "ste", "bit": 6})
    with pytest.raises(QATError, match="would do nothing"):
        QAT(looped_model(), QATConfig(mode="ste", float_max_numel=10**9))
    with pytest.raises(QATError, match="off"):
        QAT(looped_model(), QATConfig(mode="off"))
    assert QATConfig(bits=6, role_bits={"mlp": 5}).bits_for("mlp") == 5


@pytest.mark.parametrize("mode", ["ste", "noise"])
def test_training_with_qat_then_export(tmp_path, mode):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(20_000, vocab=64, seed=3))
    preset = get_preset("debug")
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": 64, "plan": PlanSpec("cycle", layers=1, loops=2).to_dict()})
    torch.manual_seed(0)
    model = GPT(cfg)
    loader = TokenLoader([path], preset.train.seq_len, seed=0)
    cb = QAT(model, QATConfig(mode=mode, start_frac=0.5, bits=6, float_max_numel=0))
    result = train(model, loader, preset.train, device=torch.device("cpu"), on_step=cb, forward=cb.forward, progress=False)
    assert result.steps == preset.train.max_steps and cb.start_step == preset.train.max_steps // 2
    export_model(model, tmp_path / "a.lgz", bits=6, codec="zlib")
    reloaded, _ = load_model(tmp_path / "a.lgz")
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(reloaded(x)).all()


@pytest.mark.parametrize("mode", ["ste", "noise"])
def test_resume_after_qat_started_repeats_the_uninterrupted_run(tmp_path, mode):
    """The checkpoint carries the QAT hook: when it started and, in noise mode, where every noise
    generator stands, so a resumed run draws exactly the noise the uninterrupted one drew."""
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(20_000, vocab=64, seed=3))
    preset = get_preset("debug")
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": 64, "plan": PlanSpec("cycle", layers=1, loops=2).to_dict()})
    tcfg = replace(preset.train, max_steps=10)

    qat_cfg = QATConfig(mode=mode, start_frac=0.3, bits=6, float_max_numel=0, seed=4)

    def run(seed: int, hook=None, **kw):
        torch.manual_seed(seed)
        model = GPT(cfg)
        qat = QAT(model, qat_cfg)
        result = train(
            model,
            TokenLoader([path], tcfg.seq_len, seed=0),
            tcfg,
            device=torch.device("cpu"),
            on_step=qat if hook is None else hook(qat),
            forward=qat.forward,
            progress=False,
            **kw,
        )
        return result, model, qat

    full, full_model, full_cb = run(0)
    assert full_cb.start_step == 3

    class Killed(Exception):
        pass

    def dies_at_7(qat):
        def hook(step, progress, model):
            qat(step, progress, model)
            if step == 7:
                raise Killed

        hook.state_dict = qat.state_dict  # the hook's state is what the checkpoint keeps
        return hook

    policy = CheckpointPolicy(tmp_path / "checkpoint.pt", every=5)
    with pytest.raises(Killed):
        run(0, dies_at_7, checkpoint=policy)
    ckpt = read_checkpoint(policy.path)
    assert ckpt["train"]["step"] == 5 and ckpt["hook"]["start_step"] == 3

    resumed, resumed_model, resumed_cb = run(99, resume=ckpt)
    assert resumed.resumed_from == 5 and resumed_cb.start_step == 3 and resumed_cb.weights == full_cb.weights
    assert resumed.losses == full.losses  # bit-for-bit on CPU, the noise draws included
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_qat_hook_state_is_checked():
    cb = QAT(looped_model(), QATConfig(mode="noise", float_max_numel=0))
    with pytest.raises(QATError, match="noise generators"):
        cb.load_state_dict({"start_step": 2, "weights": 3, "noise_rng": [torch.zeros(8, dtype=torch.uint8)]})


def test_ste_qat_shrinks_the_int4_roundtrip_gap(tmp_path):
    """What QAT is for: after STE QAT at 4 bits, the loss lost in the int4 export roundtrip is
    smaller than after the same training without QAT (same seed, data and steps)."""
    from loopgolf.export.quantize import parse_policy

    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(40_000, vocab=64, seed=3))
    held = torch.as_tensor(markov_tokens(4_000, vocab=64, seed=3)[-2048:].astype("int64")).view(-1, 64)
    preset = get_preset("debug")
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": 64, "plan": PlanSpec("cycle", layers=1, loops=3).to_dict()})
    tcfg = replace(preset.train, max_steps=80, val_every=0)
    gaps = {}
    for mode in ("off", "ste"):
        torch.manual_seed(0)
        model = GPT(cfg)
        qat = None if mode == "off" else QAT(model, QATConfig(mode="ste", bits=4, start_frac=0.5, float_max_numel=0))
        train(
            model,
            TokenLoader([path], tcfg.seq_len, seed=0),
            tcfg,
            device=torch.device("cpu"),
            on_step=qat,
            forward=None if qat is None else qat.forward,
            progress=False,
        )
        export_model(model, tmp_path / f"{mode}.lgz", policy=parse_policy("int4,fp16max=0"), codec="zlib")
        reloaded, _ = load_model(tmp_path / f"{mode}.lgz")
        with torch.no_grad():
            gaps[mode] = float(reloaded(held[:, :-1], held[:, 1:])) - float(model(held[:, :-1], held[:, 1:]))
    assert gaps["off"] > 0.005  # int4 costs a plain model something measurable here
    assert gaps["ste"] < gaps["off"] / 2, gaps
