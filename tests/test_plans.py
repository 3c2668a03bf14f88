import pytest
import torch
from helpers import tiny_config

from loopgolf.model.gpt import GPT, effective_params, unique_params, unique_params_formula
from loopgolf.model.plan import PlanSpec, build_plan, parse_plan

EXPECTED = [
    ("vanilla:3", [0, 1, 2], [0, 1, 2], [0, 0, 0]),
    ("cycle:3x2", [0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]),
    ("sequence:3x2", [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]),
    ("cycle-rev:3x3", [0, 1, 2, 2, 1, 0, 0, 1, 2], [0, 1, 2, 2, 1, 0, 0, 1, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2]),
    ("middle-cycle:1+2x3+1", [0, 1, 2, 1, 2, 1, 2, 3], [0, 1, 2, 1, 2, 1, 2, 3], [0, 0, 0, 1, 1, 2, 2, 0]),
    ("middle-sequence:1+2x2+2", [0, 1, 1, 2, 2, 3, 4], [0, 1, 1, 2, 2, 3, 4], [0, 0, 1, 0, 1, 0, 0]),
    ("mini-loop:6:2-3x2", [0, 1, 2, 3, 2, 3, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3, 2, 3, 4, 5], [0, 0, 0, 0, 1, 1, 2, 2, 0, 0]),
    ("cycle:2x3@mlp", [0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]),
    ("cycle:2x3@attn", [0, 1, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2]),
    ("explicit:0,1,1,0/0,0,1,1", [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]),
]


@pytest.mark.parametrize("text,attn_of,mlp_of,loop_of", EXPECTED)
def test_plan_maps(text, attn_of, mlp_of, loop_of):
    plan = build_plan(parse_plan(text))
    assert list(plan.attn_of) == attn_of and list(plan.mlp_of) == mlp_of and list(plan.loop_of) == loop_of
    assert PlanSpec.from_dict(plan.spec.to_dict()) == plan.spec


def test_mini_loop_matches_the_parameter_golf_records():
    plan = build_plan(PlanSpec("mini-loop", layers=11, loops=2, loop_start=3, loop_end=5))
    assert plan.num_virtual == 17 and plan.num_attn == 11
    assert plan.active_layers(0) == tuple(range(6)) + tuple(range(12, 17))
    assert len(plan.active_layers(1)) == 14 and len(plan.active_layers(2)) == 17


RELAX = [
    {},
    {"per_layer_controls": True},
    {"depth_embeddings": True},
    {"lora_ranks": {"q": 2, "mlp_out": 3}},
    {"per_layer_controls": True, "depth_embeddings": True, "lora_ranks": dict.fromkeys(("q", "k", "v", "o", "mlp_in", "mlp_out"), 2), "tie_embeddings": False},
]


@pytest.mark.parametrize("text", [e[0] for e in EXPECTED])
@pytest.mark.parametrize("relax", RELAX, ids=lambda r: "+".join(r) or "strict")
def test_unique_params_formula_every_plan(text, relax):
    cfg = tiny_config(plan=parse_plan(text), **relax)
    model = GPT(cfg)
    assert unique_params(model) == unique_params_formula(cfg)
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert effective_params(model) >= unique_params(model) - (cfg.vocab_size * cfg.model_dim if not cfg.tie_embeddings else 0)


def test_closed_form_cycle_with_lora():
    # Hand-written formula for CYCLE K x B with rank-r LoRA on q and per-layer controls.
    k, b, r, d = 2, 3, 4, 32
    cfg = tiny_config(plan=PlanSpec("cycle", layers=k, loops=b), per_layer_controls=True, lora_ranks={"q": r})
    v = k * b
    kv = 2 * (d // 4)
    block = 2 * d * d + 2 * d * kv + 2 * d * 2 * d
    controls = v * (4 * d + 4)
    expected = 64 * d + k * block + controls + (v // 2) * d + v * r * (d + d)
    assert unique_params(GPT(cfg)) == expected


def test_stage_runs_only_the_enabled_passes():
    model = GPT(tiny_config(plan=PlanSpec("cycle", layers=2, loops=3)))
    assert model.active_layers == tuple(range(6))
    model.set_stage(0)
    assert model.active_layers == (0, 1)
    model.set_stage(1)
    assert model.active_layers == (0, 1, 2, 3)
    model.set_stage(2)
    assert model.stage is None and len(model.active_layers) == 6
    with pytest.raises(ValueError, match="outside"):
        model.set_stage(3)
    # stage 0 of a CYCLE plan is the K-block vanilla stack, without its skip: the full plan's
    # skips pair (2, 3), (1, 4), (0, 5), none of which runs at stage 0
    flat = GPT(tiny_config(plan=PlanSpec("vanilla", layers=2)))
    model.set_stage(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("skip_weight")}
    flat.load_state_dict({**state, "skip_weight": torch.zeros_like(flat.skip_weight)}, strict=True)
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(x), flat(x), rtol=0, atol=0)


def test_skip_pairs_are_fixed_by_the_full_plan_at_every_stage():
    """Progressive recurrence must not hand a learned skip row to another (encoder, decoder)
    pair: at each stage of pg-mini-loop's plan the rows that receive gradient are exactly those
    whose full-plan pair runs, and the rows the full plan pairs up are never reassigned."""
    from loopgolf.config import get_preset

    plan = get_preset("pg-mini-loop").model.plan
    model = GPT(tiny_config(plan=plan))
    pairs = model.plan.skip_pairs
    v = model.plan.num_virtual
    assert pairs == tuple((v // 2 - 1 - i, v // 2 + i) for i in range(v // 2))
    x = torch.randint(0, 64, (2, 8))
    for stage in range(model.plan.num_loops):
        model.set_stage(stage)
        active = set(model.active_layers)
        model.zero_grad(set_to_none=True)
        model(x, x).backward()
        rows = {i for i in range(len(pairs)) if model.skip_weight.grad[i].abs().sum() > 0}
        used = {i for i, (enc, dec) in enumerate(pairs) if enc in active and dec in active}
        assert rows == used, (stage, sorted(rows), sorted(used))
        assert stage < model.plan.num_loops - 1 or used == set(range(len(pairs)))


@pytest.mark.parametrize(
    "spec, match",
    [
        (PlanSpec("vanilla", layers=3, loops=2), "kind='cycle'"),
        (PlanSpec("vanilla", layers=3, first=2), "does not use first"),
        (PlanSpec("vanilla", layers=3, share="mlp"), "nothing is shared"),
        (PlanSpec("cycle", layers=2, loops=2, loop_start=1), "does not use loop_start"),
        (PlanSpec("mini-loop", layers=4, loops=1, loop_start=1, loop_end=2, last=3), "does not use last"),
        (PlanSpec("explicit", attn_of=(0, 1), mlp_of=(0, 0), loops=2), "does not use loops"),
        (PlanSpec("explicit", attn_of=(0, 1), mlp_of=(0, 0), share="attn"), "already say"),
        (PlanSpec("cycle", layers=2, loops=2, attn_of=(0, 1)), "does not use attn_of"),
    ],
)
def test_fields_a_plan_kind_does_not_use_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        build_plan(spec)


def test_explicit_plans_refuse_a_sharing_suffix():
    with pytest.raises(ValueError, match="already say"):
        build_plan(parse_plan("explicit:0,1,0,1@mlp"))
    with pytest.raises(ValueError, match="nothing is shared"):
        build_plan(parse_plan("vanilla:4@attn"))
    plan = build_plan(parse_plan("explicit:0,1,0,1/0,0,1,1"))  # what @mlp meant, said by the lists
    assert plan.attn_of == (0, 1, 0, 1) and plan.mlp_of == (0, 0, 1, 1)
    # explicit configs written before record layers = stored attention count: still accepted
    assert build_plan(PlanSpec.from_dict(parse_plan("explicit:0,1,0,1").to_dict())).num_attn == 2
