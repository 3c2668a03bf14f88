from dataclasses import replace

import pytest
import torch

from conftest import markov_tokens
from loopgolf.config import get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.export.pack import export_model, load_model
from loopgolf.export.artifact import ArtifactError
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.train.checkpoint import CheckpointPolicy, read_checkpoint
from loopgolf.train.qat import QATConfig, QATError, attach_qat, make_qat_callback, qat_targets, remove_qat, row_step
from loopgolf.train.trainer import train


def looped_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1, plan=PlanSpec("cycle", layers=2, loops=3), lora_ranks={"q": 2})
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
    names = [n for n, _ in qat_targets(model, float_max_numel=0)]
    assert names == [f"attn.{i}.{p}" for i in range(2) for p in ("c_q", "c_k", "c_v", "proj")] + [f"mlps.{i}.{p}" for i in range(2) for p in ("fc", "proj")]
    # Tensors the exporter keeps as floats are not fake-quantized.
    assert [n for n, _ in qat_targets(model, float_max_numel=1024)] == ["mlps.0.fc", "mlps.0.proj", "mlps.1.fc", "mlps.1.proj"]


@pytest.mark.parametrize("bits", [6, 4])
def test_ste_forward_is_the_quantized_weight_and_gradient_passes_straight(bits):
    model = looped_model()
    w = model.attn[0].c_q.weight
    plain = w.detach().clone()
    assert attach_qat(model, QATConfig(mode="ste", bits=bits, float_max_numel=0)) == 12
    assert model.attn[0].c_q.parametrizations.weight.original is w  # the optimizer's Parameter
    torch.testing.assert_close(model.attn[0].c_q.weight, reference_fake_quant(plain, bits), rtol=0, atol=0)
    x = torch.randint(0, 64, (2, 8))
    model(x, x).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    # Straight through: d(loss)/dw equals d(loss)/d(quantized w), which a plain model holding the
    # quantized weights computes.
    ref = looped_model()
    ref.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v for k, v in model.state_dict().items()})
    with torch.no_grad():
        for name, mod in qat_targets(ref, 0):
            mod.weight.copy_(reference_fake_quant(mod.weight, bits))
    ref(x, x).backward()
    torch.testing.assert_close(w.grad, ref.attn[0].c_q.weight.grad)


def test_noise_is_one_step_wide_fixed_within_a_step_and_resampled():
    model = looped_model()
    attach_qat(model, QATConfig(mode="noise", bits=6, float_max_numel=0, seed=1))
    mod = model.mlps[1].fc
    w = mod.parametrizations.weight.original.detach()
    a, b = mod.weight.detach(), mod.weight.detach()
    assert torch.equal(a, b)  # every loop over the block sees the same perturbation
    step = row_step(w, 31)
    assert bool(((a - w).abs() <= step / 2 + 1e-7).all()) and float((a - w).abs().max()) > 0.3 * float(step.max())
    cb = make_qat_callback(QATConfig(mode="noise", bits=6, float_max_numel=0, start_frac=0.0))
    cb(0, 0.0, model)  # the callback draws fresh noise before every optimizer step
    assert not torch.equal(mod.weight.detach(), a)


def test_callback_switches_on_at_start_frac_and_remove_restores_plain_weights():
    model = looped_model()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    cb = make_qat_callback(QATConfig(mode="ste", start_frac=0.5, float_max_numel=0))
    cb(0, 0.2, model)
    assert cb.start_step is None and list(model.state_dict()) == keys_before
    cb(7, 0.5, model)
    assert cb.start_step == 7 and cb.weights == 12
    assert any("parametrizations" in k for k in model.state_dict())
    with pytest.raises(ArtifactError, match="remove_qat"):
        export_model(model, "/nonexistent/never.lgz")
    assert remove_qat(model) == 12 and remove_qat(model) == 0
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())
    make_qat_callback(QATConfig(mode="off", start_frac=0.0))(0, 1.0, model)
    assert list(model.state_dict()) == keys_before


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
        attach_qat(looped_model(), QATConfig(mode="ste", float_max_numel=10**9))
    assert QATConfig(bits=6, role_bits={"mlp": 5}).bits_for("mlps.0.fc") == 5


@pytest.mark.parametrize("mode", ["ste", "noise"])
def test_training_with_qat_then_export(tmp_path, mode):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(20_000, vocab=64, seed=3))
    preset = get_preset("debug")
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": 64, "plan": PlanSpec("cycle", layers=1, loops=2).to_dict()})
    torch.manual_seed(0)
    model = GPT(cfg)
    loader = TokenLoader([path], preset.train.seq_len, seed=0)
    cb = make_qat_callback(QATConfig(mode=mode, start_frac=0.5, bits=6, float_max_numel=0))
    result = train(model, loader, preset.train, device=torch.device("cpu"), on_step=cb, progress=False)
    assert result.steps == preset.train.max_steps and cb.start_step == preset.train.max_steps // 2
    remove_qat(model)
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

    def run(seed: int, on_step, **kw):
        torch.manual_seed(seed)
        model = GPT(cfg)
        result = train(model, TokenLoader([path], tcfg.seq_len, seed=0), tcfg, device=torch.device("cpu"),
                       on_step=on_step, progress=False, **kw)
        return result, model

    def qat():
        return make_qat_callback(QATConfig(mode=mode, start_frac=0.3, bits=6, float_max_numel=0, seed=4))

    full_cb = qat()
    full, full_model = run(0, full_cb)
    assert full_cb.start_step == 3

    class Killed(Exception):
        pass

    killed_cb = qat()

    def die_at_7(step, progress, model):
        killed_cb(step, progress, model)
        if step == 7:
            raise Killed

    die_at_7.state_dict = killed_cb.state_dict  # the hook's state is what the checkpoint keeps
    policy = CheckpointPolicy(tmp_path / "checkpoint.pt", every=5)
    with pytest.raises(Killed):
        run(0, die_at_7, checkpoint=policy)
    ckpt = read_checkpoint(policy.path)
    assert ckpt["train"]["step"] == 5 and ckpt["hook"]["start_step"] == 3

    resumed_cb = qat()
    resumed, resumed_model = run(99, resumed_cb, resume=ckpt)
    assert resumed.resumed_from == 5 and resumed_cb.start_step == 3 and resumed_cb.weights == full_cb.weights
    assert resumed.losses == full.losses  # bit-for-bit on CPU, the noise draws included
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_qat_hook_state_is_checked():
    cb = make_qat_callback(QATConfig(mode="noise", float_max_numel=0))
    cb.load_state_dict({"start_step": 2, "weights": 3, "noise_rng": [torch.zeros(8, dtype=torch.uint8)]})
    with pytest.raises(QATError, match="noise generators"):
        cb(4, 0.9, looped_model())
