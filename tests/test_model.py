import pytest
import torch
from helpers import TINY, tiny_config

from loopgolf.model.gpt import GPT, ModelConfig, effective_params, forward_flops_per_token, unique_params, unique_params_formula
from loopgolf.model.plan import PlanSpec, build_plan, parse_plan


def tiny(plan: PlanSpec, **kw) -> ModelConfig:
    return tiny_config(plan=plan, **kw)


def test_baseline_param_count_matches_official():
    # The official naive baseline (9 x 512, 8/4 heads, vocab 1024, tied) has 17,059,912 params: its
    # record's train.log (openai/parameter-golf, records/track_10min_16mb/2026-03-17_NaiveBaseline)
    # prints model_params:17059912.
    with torch.device("meta"):
        model = GPT(ModelConfig())
    assert unique_params(model) == 17_059_912
    assert effective_params(model) == 17_059_912


@pytest.mark.parametrize(
    "plan",
    [
        PlanSpec("vanilla", layers=3),
        PlanSpec("cycle", layers=2, loops=3),
        PlanSpec("cycle", layers=1, loops=4),
        PlanSpec("explicit", layers=2, attn_of=(0, 1, 1, 0), mlp_of=(0, 0, 0, 0)),
    ],
)
@pytest.mark.parametrize("per_layer_controls", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_unique_params_formula(plan, per_layer_controls, tie):
    cfg = tiny(plan, per_layer_controls=per_layer_controls, tie_embeddings=tie)
    model = GPT(cfg)
    assert unique_params(model) == unique_params_formula(cfg)
    # model.parameters() holds each shared tensor once
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert sum(p.numel() for _, p in model.state_dict().items()) >= unique_params(model)


def test_cycle_stores_exactly_k_blocks():
    k, b = 3, 4
    cfg = tiny(PlanSpec("cycle", layers=k, loops=b))
    model = GPT(cfg)
    assert len(model.attn) == k and len(model.mlps) == k
    assert model.plan.num_virtual == k * b
    assert model.plan.attn_of == tuple(list(range(k)) * b)
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    per_block = 2 * d * d + 2 * d * kv + 2 * d * cfg.mlp_mult * d + 3 * d + d + cfg.num_heads
    skips = (k * b // 2) * d
    assert unique_params(model) == cfg.vocab_size * d + k * per_block + skips


def test_effective_params_equal_unrolled_vanilla():
    cyc = GPT(tiny(PlanSpec("cycle", layers=2, loops=3)))
    flat = GPT(tiny(PlanSpec("vanilla", layers=6)))
    assert effective_params(cyc) == unique_params(flat) == effective_params(flat)


def test_one_loop_plan_equals_plain_stack():
    torch.manual_seed(0)
    plain = GPT(tiny(PlanSpec("vanilla", layers=3)))
    # Non-zero output projections so every layer matters.
    with torch.no_grad():
        for p in plain.parameters():
            if p.ndim == 2 and p.shape[0] > 4:
                p.normal_(0, 0.2)
    for plan in (PlanSpec("cycle", layers=3, loops=1), PlanSpec("explicit", layers=3, attn_of=(0, 1, 2), mlp_of=(0, 1, 2))):
        other = GPT(tiny(plan))
        other.load_state_dict(plain.state_dict(), strict=True)
        x = torch.randint(0, 64, (2, 12))
        torch.testing.assert_close(other(x), plain(x), rtol=0, atol=0)


def _unroll(cyc: GPT) -> GPT:
    """An untied copy: one private set of weights per virtual layer."""
    plan = cyc.plan
    flat = GPT(tiny(PlanSpec("vanilla", layers=plan.num_virtual)))
    with torch.no_grad():
        flat.tok_emb.weight.copy_(cyc.tok_emb.weight)
        flat.skip_weight.copy_(cyc.skip_weight)
        for v in range(plan.num_virtual):
            a, m = plan.attn_of[v], plan.mlp_of[v]
            flat.attn[v].load_state_dict(cyc.attn[a].state_dict())
            flat.mlps[v].load_state_dict(cyc.mlps[m].state_dict())
            flat.attn_scale[v].copy_(cyc.attn_scale[a])
            flat.resid_mix[v].copy_(cyc.resid_mix[a])
            flat.q_gain[v].copy_(cyc.q_gain[a])
            flat.mlp_scale[v].copy_(cyc.mlp_scale[m])
    return flat


def test_shared_gradient_is_sum_of_per_use_gradients():
    torch.manual_seed(1)
    cyc = GPT(tiny(PlanSpec("cycle", layers=2, loops=3)))
    with torch.no_grad():
        for p in cyc.parameters():
            if p.ndim == 2 and p.shape[0] >= 32:
                p.normal_(0, 0.1)
    flat = _unroll(cyc)
    x = torch.randint(0, 64, (2, 10))
    y = torch.randint(0, 64, (2, 10))
    loss_c, loss_f = cyc(x, y), flat(x, y)
    torch.testing.assert_close(loss_c, loss_f)
    loss_c.backward()
    loss_f.backward()
    plan = cyc.plan
    for k in range(plan.num_attn):
        uses = [v for v in range(plan.num_virtual) if plan.attn_of[v] == k]
        for name, p in cyc.attn[k].named_parameters():
            expected = sum(dict(flat.attn[v].named_parameters())[name].grad for v in uses)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
    for k in range(plan.num_mlp):
        uses = [v for v in range(plan.num_virtual) if plan.mlp_of[v] == k]
        for name, p in cyc.mlps[k].named_parameters():
            expected = sum(dict(flat.mlps[v].named_parameters())[name].grad for v in uses)
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cyc.tok_emb.weight.grad, flat.tok_emb.weight.grad, rtol=1e-4, atol=1e-6)


def test_plan_validation_and_parsing():
    assert parse_plan("cycle:3x2") == PlanSpec("cycle", layers=3, loops=2)
    assert parse_plan("vanilla:5") == PlanSpec("vanilla", layers=5)
    assert build_plan(parse_plan("explicit:0,1,0/0,0,0")).mlp_of == (0, 0, 0)
    with pytest.raises(ValueError, match="never uses"):
        build_plan(PlanSpec("explicit", attn_of=(0, 2), mlp_of=(0, 0)))
    with pytest.raises(ValueError, match="unknown plan kind"):
        build_plan(PlanSpec("spiral"))
    with pytest.raises(ValueError, match="cannot parse"):
        parse_plan("cycle:three")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(model_dim=30, num_heads=4)


def test_config_roundtrip_and_flops():
    cfg = tiny(PlanSpec("cycle", layers=2, loops=2), per_layer_controls=True)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    # Recursion costs its FLOPs: a B-loop plan executes B times the block matmuls.
    f1 = forward_flops_per_token(tiny(PlanSpec("cycle", layers=2, loops=1)), 64)
    f3 = forward_flops_per_token(tiny(PlanSpec("cycle", layers=2, loops=3)), 64)
    head = 2 * TINY["model_dim"] * TINY["vocab_size"]
    assert f3 - head == 3 * (f1 - head)


def test_training_step_after_an_inference_mode_evaluation():
    """The rotary tables are built with the model: an evaluation under inference_mode must not
    leave inference tensors behind for the next training step to save for backward."""
    model = GPT(tiny_config(plan=PlanSpec("cycle", layers=2, loops=2)))
    x = torch.randint(0, 64, (2, 12))
    with torch.inference_mode():
        model(x, x)
    model(x, x).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any("rotary" in k for k in model.state_dict())  # built, never stored
    with pytest.raises(ValueError, match="max_seq_len"):
        GPT(tiny_config(max_seq_len=8))(x)


def test_rotary_keeps_the_activation_dtype(monkeypatch):
    import loopgolf.model.gpt as gpt

    seen = []
    original = gpt.apply_rotary

    def spy(x, cos, sin):
        out = original(x, cos, sin)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(gpt, "apply_rotary", spy)
    model = GPT(tiny_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (1, 6)))
    assert seen and all(out == x == torch.bfloat16 for x, out in seen)


OPTION_SETS = [
    dict(norm="rms_scaled", qk_norm=False, embed_norm=False, unet_skips=False, logit_softcap=None, mlp_act="swiglu", mlp_hidden=40),
    dict(norm="rms_offset", embed_scale=5.0, mlp_act="geglu", lora_ranks={"mlp_gate": 2, "q": 3}, bias=True),
    dict(norm="layer", norm_eps=1e-5, pos_emb="learned", max_seq_len=64, mlp_act="gelu", bias=True, tie_embeddings=False),
]


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("per_layer_controls", [False, True])
def test_architecture_options_count_train_and_have_roles(options, per_layer_controls):
    from loopgolf.model.roles import parameter_roles
    from loopgolf.train.optim import split_parameters

    cfg = tiny(PlanSpec("cycle", layers=2, loops=2), per_layer_controls=per_layer_controls, **options)
    model = GPT(cfg)
    assert unique_params(model) == unique_params_formula(cfg)
    roles = parameter_roles(model)
    assert len(roles) == len(list(model.parameters()))
    assert sum(len(g) for g in split_parameters(model).values()) == len(roles)
    with torch.no_grad():  # zero-initialised output projections would hide the gains' gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    touched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    for name in ("attn_norm", "mlp_norm", "final_norm", "bias.q", "mlps.0.gate.weight", "pos_emb.weight"):
        if name in roles:
            assert name in touched, name  # every option's parameters are really used
    assert len(model.loop_logits(x)) == 2


def test_default_options_are_the_baseline_and_bad_options_are_refused():
    cfg = tiny(PlanSpec("vanilla", layers=2))
    assert (cfg.norm, cfg.qk_norm, cfg.embed_norm, cfg.pos_emb, cfg.mlp_act, cfg.bias) == ("rms", True, True, "rope", "relu2", False)
    for bad in (dict(norm="batch"), dict(mlp_act="tanh"), dict(pos_emb="alibi"), dict(lora_ranks={"mlp_gate": 2}), dict(norm_eps=0.0), dict(embed_scale=-1.0)):
        with pytest.raises(ValueError):
            tiny(PlanSpec("vanilla", layers=2), **bad)


LAYER_PATH_OPTIONS = [
    dict(norm="layer", bias=True, depth_embeddings=True, lora_ranks={"q": 2, "v": 3, "o": 2, "mlp_in": 2, "mlp_out": 2}),
    dict(norm="rms_scaled", bias=True, depth_embeddings=True, lora_ranks={"q": 2, "k": 2, "mlp_gate": 2}, mlp_act="swiglu"),
]


def _perturbed(options: dict, per_layer_controls: bool = True) -> GPT:
    torch.manual_seed(3)
    model = GPT(tiny(PlanSpec("cycle", layers=2, loops=3), per_layer_controls=per_layer_controls, **options))
    with torch.no_grad():  # every control, gain, bias and adapter away from its identity start
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("options", LAYER_PATH_OPTIONS, ids=["layer", "rms_scaled"])
def test_int_layer_call_is_the_per_row_call_with_every_row_at_one_layer(options):
    """One layer path: GPT.layer(v) and GPT.layer([v] * B) (the serving call) give the same
    output, keys and values, and gradients, bit for bit."""
    model = _perturbed(options)
    x, x0 = torch.randn(3, 6, 32), torch.randn(3, 6, 32)
    cos, sin = model.rotary(6)
    for v in range(model.plan.num_virtual):
        outs, grads = [], []
        for call in (v, [v] * 3):
            model.zero_grad()
            y = model.layer(call, x, x0, cos, sin)
            y.square().sum().backward()
            outs.append((y.detach(), *model.layer_kv(call, x, x0, cos, sin)))
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for a, b in zip(*outs):
            assert torch.equal(a, b), v
        assert grads[0].keys() == grads[1].keys() and any(n.startswith("lora.") for n in grads[0])
        for n in grads[0]:
            assert torch.equal(grads[0][n], grads[1][n]), (v, n)


@pytest.mark.parametrize("options", LAYER_PATH_OPTIONS, ids=["layer", "rms_scaled"])
@pytest.mark.parametrize("per_layer_controls", [True, False])
def test_per_row_layer_call_equals_each_row_run_alone(options, per_layer_controls):
    """Rows at different depths of one stored block (gathered controls, norm gains, biases and
    a LoRA run per layer) give what each row gives run alone at its layer."""
    model = _perturbed(options, per_layer_controls)
    vs = [0, 0, 2, 4, 4]  # cycle 2x3: layers 0, 2 and 4 run stored block 0
    x, x0 = torch.randn(5, 6, 32), torch.randn(5, 6, 32)
    cos, sin = model.rotary(6)
    with torch.no_grad():
        y = model.layer(vs, x, x0, cos, sin)
        k, val = model.layer_kv(vs, x, x0, cos, sin)
        for row, v in enumerate(vs):
            torch.testing.assert_close(y[row], model.layer(v, x[row : row + 1], x0[row : row + 1], cos, sin)[0])
            k1, v1 = model.layer_kv(v, x[row : row + 1], x0[row : row + 1], cos, sin)
            torch.testing.assert_close(k[row], k1[0])
            torch.testing.assert_close(val[row], v1[0])
    with pytest.raises(ValueError, match="contiguous"):
        model.layer([0, 2, 0, 4, 4], x, x0, cos, sin)
    with pytest.raises(ValueError, match="share their stored"):
        model.layer([0, 1, 2, 4, 4], x, x0, cos, sin)
