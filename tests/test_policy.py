import pytest

from loopgolf.export.encode import stored_scheme
from loopgolf.export.policy import FLOAT16_BITS, PolicyError, QuantPolicy, parse_policy, tensor_role
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec


def test_roles_of_every_model_tensor():
    cfg = ModelConfig(vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1, plan=PlanSpec("cycle", layers=2, loops=2),
                      per_layer_controls=True, depth_embeddings=True, lora_ranks={"q": 2, "mlp_out": 1}, tie_embeddings=False)
    roles = {n: tensor_role(n) for n in GPT(cfg).state_dict()}
    assert roles["tok_emb.weight"] == roles["lm_head.weight"] == "embed"
    assert roles["attn.1.c_k.weight"] == "attn" and roles["mlps.0.proj.weight"] == "mlp"
    assert roles["lora.q.A.3"] == roles["lora.mlp_out.B.0"] == "lora"
    for name in ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "depth_emb"):
        assert roles[name] == "control", name
    assert set(roles.values()) == {"embed", "attn", "mlp", "lora", "control"}
    assert tensor_role("something.else") == "other"


def test_parse_policy_syntax():
    assert parse_policy("") == parse_policy(None) == QuantPolicy()
    p = parse_policy("int6")
    assert (p.attn_bits, p.mlp_bits, p.lora_bits, p.other_bits, p.embed_bits) == (6, 6, 6, 6, 8)
    p = parse_policy("attn=6, mlp=5, embed=7, gptq")
    assert (p.attn_bits, p.mlp_bits, p.embed_bits, p.gptq) == (6, 5, 7, True)
    p = parse_policy("all=5,embed=fp16,clip=mse,outliers=64,lowrank=4,fp16max=1024,control=fp16,percentile=99.9,damp=0.05,block=64")
    assert p.embed_bits == FLOAT16_BITS and p.attn_bits == 5 and p.clip == "mse" and p.outlier_topk == 64
    assert p.lowrank_rank == 4 and p.float_max_numel == 1024 and not p.control_fp32
    assert p.clip_percentile == 99.9 and p.gptq_damp == 0.05 and p.gptq_block == 64
    assert parse_policy("int4,mlp=int8").mlp_bits == 8  # left to right
    assert parse_policy("gptq=0").gptq is False


@pytest.mark.parametrize("text", ["int6", "attn=6,mlp=5,embed=8,gptq", "all=4,embed=fp16,clip=mse,outliers=3,lowrank=2,control=fp16,fp16max=0"])
def test_describe_and_dict_roundtrip(text):
    p = parse_policy(text)
    assert parse_policy(p.describe()) == p
    assert QuantPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "text, message",
    [
        ("int9", "attn_bits"),
        ("int1", "attn_bits"),
        ("attn=x", "bit width"),
        ("clip=max", "clip must be"),
        ("bogus=1", "unknown policy item"),
        ("int6,,gptq", "empty item"),
        ("outliers=-1", "non-negative"),
        ("control=fp8", "bad value"),
        ("control=6", "bad value"),
    ],
)
def test_bad_policies_say_what_is_wrong(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)
    assert issubclass(PolicyError, ValueError)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(PolicyError, match="unknown policy field"):
        QuantPolicy.from_dict({"bits": 6})


def test_stored_scheme_follows_role_size_and_threshold():
    p = parse_policy("int6,embed=7,lora=fp16,fp16max=100")
    assert stored_scheme("attn.0.c_q.weight", (32, 32), p) == "int6_row"
    assert stored_scheme("tok_emb.weight", (64, 32), p) == "int7_row"
    assert stored_scheme("lora.q.A.0", (32, 8), p) == "float16"  # fp16 role
    assert stored_scheme("mlps.0.fc.weight", (10, 10), p) == "float16"  # at the threshold
    assert stored_scheme("attn_scale", (2, 1000), p) == "float32"  # control: never coded
    assert stored_scheme("attn_scale", (2, 4), parse_policy("control=fp16")) == "float16"
    assert stored_scheme("other.w", (4, 8, 8), p) == "float16"  # not 2-D
    assert stored_scheme("mlps.0.fc.weight", (64, 32), QuantPolicy.uniform(5, float_max_numel=0)) == "int5_row"


def test_uniform_policy_and_bits_for():
    p = QuantPolicy.uniform(5)
    assert all(p.bits_for(r) == 5 for r in ("embed", "attn", "mlp", "lora", "other"))
    assert p.bits_for("control") is None
    with pytest.raises(PolicyError):
        p.bits_for("head")
    assert p.uses_gptq("attn") is False and QuantPolicy(gptq=True).uses_gptq("embed") is False
    assert QuantPolicy(lowrank_rank=2).uses_lowrank("mlp") and not QuantPolicy(lowrank_rank=2).uses_lowrank("lora")
