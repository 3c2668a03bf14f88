import pytest
import torch
from helpers import tiny_config

from loopgolf.config import OptimizerConfig
from loopgolf.model.gpt import GPT, UNGATED_TARGETS
from loopgolf.model.plan import PlanSpec
from loopgolf.train.optim import Muon, build_optimizers, split_parameters

PLAN = PlanSpec("cycle", layers=2, loops=3)


def randomized(model: GPT, seed: int = 0) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("lora."):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def load_shared(dst: GPT, src: GPT) -> None:
    """Copy the shared weights of ``src`` into ``dst`` (which may hold extra relaxation params)."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(("lora.", "depth_emb")) for k in missing)


def test_zero_init_relaxation_equals_strict_sharing():
    torch.manual_seed(0)
    strict = randomized(GPT(tiny_config(plan=PLAN)))
    relaxed = GPT(tiny_config(plan=PLAN, depth_embeddings=True, lora_ranks=dict.fromkeys(UNGATED_TARGETS, 3), lora_alpha=6.0))
    load_shared(relaxed, strict)
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(relaxed(x), strict(x), rtol=0, atol=0)
    # and the adapters do change the output once B is non-zero
    with torch.no_grad():
        relaxed.lora["v"].B[4].normal_(0, 0.5)
    assert not torch.allclose(relaxed(x), strict(x))


def test_per_layer_controls_start_equal_to_shared_controls():
    strict = randomized(GPT(tiny_config(plan=PLAN)))
    relaxed = GPT(tiny_config(plan=PLAN, per_layer_controls=True))
    state = strict.state_dict()
    plan = strict.plan
    for name in ("attn_scale", "resid_mix", "q_gain"):
        state[name] = state[name][list(plan.attn_of)]
    state["mlp_scale"] = state["mlp_scale"][list(plan.mlp_of)]
    relaxed.load_state_dict(state, strict=True)
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(relaxed(x), strict(x), rtol=0, atol=0)


def test_lora_is_the_low_rank_update_without_materialising_it():
    cfg = tiny_config(plan=PLAN, lora_ranks={"mlp_in": 4}, lora_alpha=2.0)
    model = randomized(GPT(cfg))
    bank = model.lora["mlp_in"]
    with torch.no_grad():
        bank.B[5].normal_()
    x = torch.randn(3, 32)
    w = model.mlps[model.plan.mlp_of[5]].fc.weight
    dense = x @ (w.T + 0.5 * bank.A[5] @ bank.B[5])  # scale = alpha / r = 2 / 4
    torch.testing.assert_close(bank.add_to(5, x, model.mlps[1].fc(x)), dense, rtol=1e-5, atol=1e-5)
    assert bank.scale == 0.5


def test_adapters_train_with_adam_unless_asked():
    model = GPT(tiny_config(plan=PLAN, lora_ranks={"q": 2}))
    roles = split_parameters(model)
    assert roles["adapter"] and all(n.startswith("lora.") for n, _ in roles["adapter"])
    adam, muon = build_optimizers(model, OptimizerConfig(), tied=True)
    adapter_ids = {id(p) for _, p in roles["adapter"]}
    assert adapter_ids <= {id(p) for g in adam.param_groups for p in g["params"]}
    assert not adapter_ids & {id(p) for g in muon.param_groups for p in g["params"]}
    opts = build_optimizers(model, OptimizerConfig(adapter_optimizer="muon"), tied=True)
    assert isinstance(opts[-1], Muon) and adapter_ids <= {id(p) for g in opts[-1].param_groups for p in g["params"]}
    with pytest.raises(ValueError, match="adapter_optimizer"):
        OptimizerConfig(adapter_optimizer="sgd")


def test_bad_lora_config():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        tiny_config(lora_ranks={"gate": 4})
    with pytest.raises(ValueError, match=r"integer in \[1, 4096\], got 0"):
        tiny_config(lora_ranks={"q": 0})
