"""The Parameter Golf record's architecture options (ModelConfig ln_scale, rope_dims, xsa,
attn_gate, skip_gates, smear_gate, mlp_act=leaky_relu2): off, the model is the baseline (no new
parameters, the golden curves in test_train hold); on, each matches a reference written here from
its definition, on tiny shapes. Cached generation with all of them on is in test_serve
(PLANS["record-options"])."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RECORD_MODEL_FIELDS, random_model, tiny_config, tiny_model

from loopgolf.model.gpt import GPT, ModelConfig, apply_rotary, exclude_own_value, rms_norm, unique_params, unique_params_formula
from loopgolf.model.plan import PlanSpec
from loopgolf.model.roles import parameter_roles

RECORD = dict(
    mlp_act="leaky_relu2",
    ln_scale=True,
    rope_dims=4,
    xsa=True,
    attn_gate=True,
    attn_gate_scale=0.5,
    gate_window=8,
    skip_gates=True,
    smear_gate=True,
    parallel_from=1,
    parallel_lanes=True,
)
CYCLE = PlanSpec("cycle", layers=2, loops=2)


def test_options_off_add_no_parameters_and_change_nothing():
    base = tiny_model(plan=CYCLE)
    # Every option at its default (off), but the gate's scale and window set: unused, they change nothing.
    off = {name: ModelConfig.__dataclass_fields__[name].default for name in RECORD}
    off = tiny_model(plan=CYCLE, **{**off, "attn_gate_scale": 0.5, "gate_window": 8})
    assert list(base.state_dict()) == list(off.state_dict())
    idx = torch.randint(0, 64, (2, 12))
    assert torch.equal(base(idx), off(idx))


def test_every_new_parameter_has_a_role():
    model = random_model(CYCLE, **RECORD)
    roles = parameter_roles(model)
    for name in ("attn_gate", "skip_gate", "smear_gate", "smear_lambda", "lane_resid", "lane_post", "lane_merge"):
        assert roles[name] == "control"
    for per_layer in (False, True):
        cfg = tiny_config(plan=CYCLE, per_layer_controls=per_layer, **RECORD)
        assert unique_params(GPT(cfg)) == unique_params_formula(cfg), per_layer


def test_leaky_relu_squared_mlp_matches_its_definition():
    model = random_model(CYCLE, mlp_act="leaky_relu2")
    mlp, x = model.mlps[0], torch.randn(2, 5, 32)
    u = x @ mlp.fc.weight.T
    h = torch.where(u > 0, u, 0.5 * u) ** 2
    assert torch.allclose(mlp(x), h @ mlp.proj.weight.T, atol=1e-5)


def _reference_attention(attn, x, q_gain, rope_dims, xsa, gate, gate_scale, window):
    """One causal GQA attention sublayer written out head by head, position by position."""
    b, t, d = x.shape
    h, hk, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.c_q.weight.T).view(b, t, h, hd)
    k = (x @ attn.c_k.weight.T).view(b, t, hk, hd)
    v = (x @ attn.c_v.weight.T).view(b, t, hk, hd)
    q, k = rms_norm(q), rms_norm(k)
    inv = 1.0 / 10000.0 ** (torch.arange(0, rope_dims, 2).float() / rope_dims)

    def rotate(z, pos):  # the first rope_dims of the head, as pairs (i, i + rope_dims/2)
        half = rope_dims // 2
        out = z.clone()
        ang = pos * inv
        a, c = z[..., :half], z[..., half:rope_dims]
        out[..., :half] = a * torch.cos(ang) + c * torch.sin(ang)
        out[..., half:rope_dims] = c * torch.cos(ang) - a * torch.sin(ang)
        return out

    y = torch.zeros(b, t, h, hd)
    for bi in range(b):
        for i in range(t):
            for hh in range(h):
                g = hh // (h // hk)
                qi = rotate(q[bi, i, hh], i) * q_gain[hh]
                scores = torch.stack([qi @ rotate(k[bi, j, g], j) for j in range(i + 1)]) / math.sqrt(hd)
                p = torch.softmax(scores, dim=0)
                out = sum(p[j] * v[bi, j, g] for j in range(i + 1))
                if xsa:
                    unit = v[bi, i, g] / v[bi, i, g].norm()
                    out = out - (out @ unit) * unit
                if gate is not None:
                    out = out * torch.sigmoid(gate_scale * (gate[hh] @ x[bi, i, :window]))
                y[bi, i, hh] = out
    return y.reshape(b, t, d) @ attn.proj.weight.T


@pytest.mark.parametrize("xsa", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_attention_options_match_a_reference(xsa, gated):
    model = random_model(CYCLE, rope_dims=4, xsa=xsa, attn_gate=gated, attn_gate_scale=0.5, gate_window=8)
    attn, x = model.attn[0], torch.randn(2, 6, 32)
    cos, sin = model.rotary(6)
    gate = model.attn_gate[0] if gated else None
    with torch.no_grad():
        got = attn(x, model.q_gain[0], cos, sin, gate=gate)
        want = _reference_attention(attn, x, model.q_gain[0], 4, xsa, gate, 0.5, 8)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_partial_rope_leaves_the_other_dims_alone_and_full_rope_is_unchanged():
    cfg = tiny_config(plan=CYCLE, rope_dims=4, max_seq_len=16)
    model = GPT(cfg)
    x = torch.randn(1, 4, 16, 8)
    cos, sin = model.rotary(16)
    assert cos.shape[-1] == 2
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.equal(y[..., :4], x[..., :4])
    full = GPT(tiny_config(plan=CYCLE, max_seq_len=16))
    c8, s8 = full.rotary(16)
    half = 4
    x1, x2 = x[..., :half], x[..., half:]
    assert torch.equal(apply_rotary(x, c8, s8), torch.cat((x1 * c8 + x2 * s8, x2 * c8 - x1 * s8), dim=-1))


def test_xsa_output_is_orthogonal_to_the_own_value():
    y, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    z = exclude_own_value(y, v)
    vr = v.repeat_interleave(2, dim=1)
    assert float((z * vr).sum(-1).abs().max()) < 1e-5
    # and nothing else changes: the removed part is along v
    diff = y - z
    assert torch.allclose(
        torch.linalg.norm(diff - (diff * vr).sum(-1, keepdim=True) * vr / vr.norm(dim=-1, keepdim=True) ** 2, dim=-1), torch.zeros(2, 4, 5), atol=1e-5
    )


def test_ln_scale_follows_the_virtual_layer_not_the_stored_block():
    """Virtual layers 0 and 2 of cycle:2x2 run stored block 0; each scales its normed inputs by
    1/sqrt(v + 1) (checked against the same layer written out)."""
    model = random_model(CYCLE, ln_scale=True)
    x, x0 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    cos, sin = model.rotary(5)
    with torch.no_grad():
        for v in range(4):
            mix = model.resid_mix[model.plan.attn_of[v]]
            h = mix[0] * x + mix[1] * x0
            f = 1.0 / math.sqrt(v + 1)
            a = model.attn[model.plan.attn_of[v]](rms_norm(h) * f, model.q_gain[model.plan.attn_of[v]], cos, sin)
            h = h + model.attn_scale[model.plan.attn_of[v]] * a
            want = h + model.mlp_scale[model.plan.mlp_of[v]] * model.mlps[model.plan.mlp_of[v]](rms_norm(h) * f)
            assert torch.allclose(model.layer(v, x, x0, cos, sin), want, atol=1e-5), v


def test_parallel_residual_follows_the_stored_mlp_in_every_pass():
    """cycle:2x2 with parallel_from=1: virtual layers 1 and 3 run stored MLP 1, which reads the
    layer's input as attention does (GPT-J: x + a * A(n(x)) + m * M(n(x))); layers 0 and 2 run
    MLP 0, which reads the attention's output. Checked against the layers written out."""
    model = random_model(CYCLE, parallel_from=1)
    x, x0 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    cos, sin = model.rotary(5)
    with torch.no_grad():
        for v in range(4):
            b, m = model.plan.attn_of[v], model.plan.mlp_of[v]
            mix = model.resid_mix[b]
            h = mix[0] * x + mix[1] * x0
            a = model.attn[b](rms_norm(h), model.q_gain[b], cos, sin)
            after = h + model.attn_scale[b] * a
            want = after + model.mlp_scale[m] * model.mlps[m](rms_norm(h if m >= 1 else after))
            assert torch.allclose(model.layer(v, x, x0, cos, sin), want, atol=1e-5), v
    sequential = random_model(CYCLE)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(model(idx), sequential(idx))  # the same weights (same seed), another model


def _lane_step(model, b, m, a_lane, m_lane, x0, cos, sin):
    """One two-lane layer over stored attention b and MLP m, written from the record's
    ``_parallel_block``: attention reads its lane mixed with x0, the MLP reads its own lane, each
    lane keeps lane_resid of itself and takes lane_post[src, lane] of each output."""
    mix = model.resid_mix[b]
    read = mix[0] * a_lane + mix[1] * x0
    att = model.attn_scale[b] * model.attn[b](rms_norm(read), model.q_gain[b], cos, sin)
    out = model.mlp_scale[m] * model.mlps[m](rms_norm(m_lane))
    keep, post = model.lane_resid[m], model.lane_post[m]
    return keep[0] * a_lane + post[0, 0] * att + post[1, 0] * out, keep[1] * m_lane + post[0, 1] * att + post[1, 1] * out


def test_two_lane_decoder_matches_the_records_definition():
    """vanilla:3 with parallel_from=1 and two lanes: layer 0 is an ordinary layer; at layer 1 its
    output becomes both lanes and the U-Net skip (layer 0 -> 1) joins the attention lane only; the
    final norm reads lane_merge * attention lane + (1 - lane_merge) * MLP lane. The whole forward
    written out."""
    model = random_model(PlanSpec("vanilla", layers=3), parallel_from=1, parallel_lanes=True)
    idx = torch.randint(0, 64, (2, 7))
    cos, sin = model.rotary(7)
    with torch.no_grad():
        x0 = model.embed(idx)
        mix = model.resid_mix[0]
        h = mix[0] * x0 + mix[1] * x0
        h = h + model.attn_scale[0] * model.attn[0](rms_norm(h), model.q_gain[0], cos, sin)
        out0 = h + model.mlp_scale[0] * model.mlps[0](rms_norm(h))
        row, enc = model.skip_from[1]
        assert enc == 0
        a, m = _lane_step(model, 1, 1, out0 + model.skip_weight[row] * out0, out0, x0, cos, sin)
        a, m = _lane_step(model, 2, 2, a, m, x0, cos, sin)
        merged = model.lane_merge * a + (1 - model.lane_merge) * m
        assert torch.allclose(model.hidden(idx), rms_norm(merged), atol=1e-5)
        # Layer by layer: a one-stream input to a two-lane layer is the same as both lanes equal.
        x = torch.randn(2, 7, 32)
        assert torch.allclose(model.layer(1, x, x0, cos, sin), model.layer(1, torch.cat((x, x), -1), x0, cos, sin), atol=1e-6)
        assert model.layer(1, x, x0, cos, sin).shape == (2, 7, 64)


def test_lanes_merge_before_a_one_stream_layer_and_rows_at_different_depths_agree():
    """A mini-loop whose looped pair mixes a two-lane block (stored MLP 2) with an ordinary one
    (1): virtual layers 0, 1, 2, 1, 2, 1, 2, 3; lanes leaving layer 2 merge entering layer 3 (stored 1).
    The serving path's rows at different depths equal each row alone."""
    plan = PlanSpec("mini-loop", layers=4, loops=2, loop_start=1, loop_end=2)
    model = random_model(plan, parallel_from=2, parallel_lanes=True, per_layer_controls=True)
    assert [model.two_lanes(v) for v in range(8)] == [False, False, True, False, True, False, True, True]
    cos, sin = model.rotary(1)
    lanes, x0 = torch.randn(3, 1, 64), torch.randn(3, 1, 32)
    with torch.no_grad():
        assert torch.allclose(model.layer(3, lanes, x0, cos, sin), model.layer(3, model.merge_lanes(lanes), x0, cos, sin))
        vs = [2, 2, 4]  # layers 2 and 4 run stored block 2
        together = model.layer(vs, lanes, x0, cos, sin)
        alone = torch.cat([model.layer(v, lanes[i : i + 1], x0[i : i + 1], cos, sin) for i, v in enumerate(vs)])
        assert torch.allclose(together, alone, atol=1e-6)


def test_rows_at_different_depths_equal_each_row_alone_with_every_option():
    """The serving path (one virtual layer per batch row) gives each row its own ln_scale factor
    and gate rows, as the training path does for the whole batch."""
    model = random_model(CYCLE, per_layer_controls=True, **RECORD)
    x, x0 = torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    cos, sin = model.rotary(1)
    vs = [0, 0, 2]  # layers 0 and 2 run the same stored block
    with torch.no_grad():
        together = model.layer(vs, x, x0, cos, sin)
        alone = torch.cat([model.layer(v, x[i : i + 1], x0[i : i + 1], cos, sin) for i, v in enumerate(vs)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_skip_gate_mixes_skip_and_residual_by_its_sigmoid():
    model = random_model(PlanSpec("vanilla", layers=4), skip_gates=True)
    row, enc = model.skip_from[3]
    x, s = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        got = model.skip_in(3, x, {enc: s})
        g = torch.sigmoid(model.skip_gate[row])
        want = g * x + (1 - g) * model.skip_weight[row] * s
    assert torch.allclose(got, want, atol=1e-6)


def test_smear_gate_matches_its_definition_and_never_crosses_a_bos():
    model = random_model(CYCLE, smear_gate=True, gate_window=8)
    bos = model.config.smear_bos_id
    idx = torch.tensor([[5, 9, 2, bos, 7, 3]])
    with torch.no_grad():
        e = model.tok_emb(idx)[0]
        lam, w = model.smear_lambda, model.smear_gate
        want = e.clone()
        for t in range(1, 6):
            if int(idx[0, t]) != bos:
                want[t] = e[t] + lam * torch.sigmoid(e[t, :8] @ w) * e[t - 1]
        assert torch.allclose(model.embed(idx)[0], rms_norm(want), atol=1e-6)
        # The document that starts at the BOS sees nothing of the one before it, in its embeddings
        # and so in its logits (attention is causal; the BOS row is the first one it reads).
        other = torch.tensor([[11, 40, 13, bos, 7, 3]])
        assert torch.equal(model.embed(idx)[0, 3:], model.embed(other)[0, 3:])
        # previous = -1 means "no token before": the first token of a prompt in a KV cache
        first = model.embed(idx[:, :1], None, torch.tensor([[-1]]))
        assert torch.equal(first, model.embed(idx)[:, :1])
        # a token given its predecessor explicitly equals the full sequence's row
        one = model.embed(idx[:, 2:3], None, idx[:, 1:2])
        assert torch.allclose(one, model.embed(idx)[:, 2:3], atol=1e-6)


def test_record_options_train_a_step_and_their_gates_get_gradients():
    # Random weights: at initialisation the zero output projections (and lam = 0) stop the gates'
    # gradients, by design (the model starts as the baseline does).
    model = random_model(CYCLE, **RECORD).train()
    idx = torch.randint(2, 64, (2, 10))
    loss = model(idx, idx)
    loss.backward()
    for name in ("attn_gate", "skip_gate", "smear_gate", "smear_lambda"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(rope_dims=3), "rope_dims"),
        (dict(rope_dims=0), "rope_dims"),
        (dict(rope_dims=10), "rope_dims"),
        (dict(rope_dims=4, pos_emb="learned"), "rope_dims needs"),
        (dict(gate_window=0), "gate_window"),
        (dict(gate_window=33), "gate_window"),
        (dict(attn_gate_scale=float("nan")), "attn_gate_scale"),
        (dict(attn_gate_scale="big"), "attn_gate_scale"),
        (dict(smear_gate=True, smear_bos_id=64), "smear_bos_id"),
        (dict(smear_gate=True, smear_bos_id=-1), "smear_bos_id"),
        (dict(xsa="yes"), "xsa"),
        (dict(mlp_act="leaky"), "mlp_act"),
        (dict(parallel_from=2), r"parallel_from must be a stored MLP index in \[0, 1\]"),
        (dict(parallel_from=-1), "parallel_from"),
        (dict(parallel_from=1.5), "parallel_from"),
        (dict(parallel_lanes=True), "parallel_lanes needs parallel_from"),
        (dict(parallel_lanes="yes", parallel_from=1), "parallel_lanes"),
    ],
)
def test_bad_record_options_are_one_line_errors(changes, needle):
    with pytest.raises(ValueError, match=needle) as e:
        tiny_config(plan=CYCLE, **changes)
    assert "\n" not in str(e.value)


def test_config_round_trips_through_a_dict():
    cfg = tiny_config(plan=CYCLE, **RECORD)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_a_checkpoint_from_before_the_options_still_resumes():
    """A run directory written before these fields existed has none of them in its model
    config; resuming it with today's (default) config is the same model."""
    from loopgolf.train.checkpoint import check_resumable

    cfg = tiny_config(plan=CYCLE).to_dict()
    old = {k: v for k, v in cfg.items() if k not in RECORD_MODEL_FIELDS}
    check_resumable({"config": {"model": old}}, cfg, {})
    with pytest.raises(ValueError, match="xsa"):
        check_resumable({"config": {"model": old}}, {**cfg, "xsa": True}, {})
    with pytest.raises(ValueError, match="parallel_from"):
        check_resumable({"config": {"model": old}}, {**cfg, "parallel_from": 1}, {})
