"""One function says what each parameter is for; the optimizer, QAT, GPTQ and the export
policy all ask it."""

import pytest
import torch
from helpers import tiny_config

from loopgolf.config import OptimizerConfig
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec
from loopgolf.model.roles import _ROLE_PATTERNS, ROLES, UnknownParameterError, parameter_role, parameter_roles, shared_matrices
from loopgolf.train.optim import Muon, build_optimizers

CONFIGS = [
    tiny_config(),
    tiny_config(tie_embeddings=False, plan=PlanSpec("cycle", layers=2, loops=3)),
    tiny_config(
        plan=PlanSpec("middle-cycle", layers=2, loops=2, first=1, last=1, share="mlp"),
        per_layer_controls=True,
        depth_embeddings=True,
        lora_ranks={"q": 2, "k": 2, "v": 2, "o": 2, "mlp_in": 2, "mlp_out": 2},
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("adapter_optimizer", ["adam", "muon"])
def test_every_parameter_has_one_role_and_one_optimizer_group(cfg, adapter_optimizer):
    model = GPT(cfg)
    for name, _ in model.named_parameters():
        assert sum(bool(p.match(name)) for _, p in _ROLE_PATTERNS) == 1, name
    roles = parameter_roles(model)
    assert set(roles.values()) <= set(ROLES)
    optimizers = build_optimizers(model, OptimizerConfig(adapter_optimizer=adapter_optimizer), tied=cfg.tie_embeddings)
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    muon = {id(p) for opt in optimizers if isinstance(opt, Muon) for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert {id(params[n]) for n, r in roles.items() if r in ("attn", "mlp")} <= muon
    assert all(id(params[n]) not in muon for n, r in roles.items() if r in ("embed", "head", "control", "depth"))
    assert set(shared_matrices(model)) == {n for n, r in roles.items() if r in ("attn", "mlp")}


def test_adapter_lr_is_honoured_under_muon():
    model = GPT(CONFIGS[2])
    adapters = {id(p) for n, p in model.named_parameters() if parameter_role(n) == "lora"}
    for name in ("adam", "muon"):
        opts = build_optimizers(model, OptimizerConfig(adapter_optimizer=name, adapter_lr=0.123, matrix_lr=0.04), tied=True)
        groups = [g for opt in opts for g in opt.param_groups if {id(p) for p in g["params"]} & adapters]
        assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == adapters
        assert groups[0]["lr"] == groups[0]["initial_lr"] == 0.123
        assert isinstance(next(o for o in opts if groups[0] in o.param_groups), Muon if name == "muon" else torch.optim.Adam)


def test_unknown_names_are_refused():
    with pytest.raises(UnknownParameterError, match="not a parameter"):
        parameter_role("blocks.0.weight")
    assert parameter_role("tok_emb.weight") == "embed" and parameter_role("lora.q.A.3") == "lora"
