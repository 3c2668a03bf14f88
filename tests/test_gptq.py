import tracemalloc

import numpy as np
import pytest
import torch
from helpers import output_error, tiny_model

from loopgolf.data.shards import load_tokens, write_shard
from loopgolf.export.artifact import dequantize_tensor
from loopgolf.export.gptq import CalibrationError, calibration_tokens, collect_hessians, gptq_quantize
from loopgolf.export.quantize import PolicyError, QuantPolicy, choose_scales, encode_tensor, parse_policy, round_codes
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec


def problem(seed: int = 0, d_in: int = 96, d_out: int = 48, n: int = 2048):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven variances, as real activations have: GPTQ's room to work.
    X = torch.randn(n, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in**0.5)
    X = X * torch.logspace(-1, 0.5, d_in)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, X.T @ X / n


def deq(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


@pytest.mark.parametrize("bits", [6, 5, 4])
def test_gptq_beats_round_to_nearest_on_output_error(bits):
    W, H = problem()
    scale = choose_scales(W, bits)
    rtn = deq(round_codes(W, scale, 2 ** (bits - 1) - 1), scale)
    codes = gptq_quantize(W, H, bits, scale)
    assert codes.dtype == torch.int8
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    assert output_error(W, deq(codes, scale), H) < 0.75 * output_error(W, rtn, H)
    # Without act-order and with tiny blocks it still helps; the lazy block update is exact.
    c2 = gptq_quantize(W, H, bits, scale, act_order=False, block_size=7)
    c3 = gptq_quantize(W, H, bits, scale, act_order=False, block_size=96)
    assert torch.equal(c2, c3)
    assert output_error(W, deq(c2, scale), H) < output_error(W, rtn, H)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    W, _ = problem(1)
    scale = choose_scales(W, 6)
    codes = gptq_quantize(W, torch.eye(W.shape[1]), 6, scale, damp=0.0)
    assert torch.equal(codes, round_codes(W, scale, 31))


def test_gptq_keep_mask_and_dead_inputs():
    W, H = problem(2)
    H[:, 5] = 0
    H[5, :] = 0  # input 5 never fires
    keep = torch.zeros_like(W, dtype=torch.bool)
    keep[0, 0] = keep[3, 10] = True
    scale = choose_scales(W.masked_fill(keep, 0.0), 5)
    codes = gptq_quantize(W, H, 5, scale, keep=keep)
    assert int(codes[0, 0]) == 0 and int(codes[3, 10]) == 0
    assert bool((codes[:, 5] == 0).all())
    with pytest.raises(CalibrationError, match="GPTQ needs W"):
        gptq_quantize(W, H[:10, :10], 5, scale)
    with pytest.raises(CalibrationError, match="one scale per row"):
        gptq_quantize(W, H, 5, scale[:3])
    with pytest.raises(CalibrationError, match="non-finite"):
        gptq_quantize(W, H * float("nan"), 5, scale)


# ------------------------------------------------------------------ outliers kept exactly


def textbook_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, scale: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Reference: GPTQ column by column in float64 with the explicit inverse Hessian, downdated
    after each column (no Cholesky, no blocks, no reordering). A kept entry is "quantized" to
    the value the artifact stores for it, its original weight in fp16, and that error is
    propagated like any other."""
    qmax = 2 ** (bits - 1) - 1
    stored = W.half().double()
    W, s = W.double().clone(), scale.double()
    n = W.shape[1]
    Hinv = torch.linalg.inv(H.double() + torch.eye(n, dtype=torch.float64) * damp * float(torch.diag(H).mean()))
    codes = torch.zeros_like(W)
    for j in range(n):
        q = torch.clamp(torch.round(W[:, j] / s), -qmax, qmax)
        codes[:, j] = torch.where(keep[:, j], 0.0, q)
        err = (W[:, j] - torch.where(keep[:, j], stored[:, j], q * s)) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes.to(torch.int8)


def outlier_problem(seed: int, d_in: int = 32, d_out: int = 16, n_outliers: int = 12):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, d_in, generator=g) @ (torch.eye(d_in) + torch.randn(d_in, d_in, generator=g) / d_in**0.5)
    W = torch.randn(d_out, d_in, generator=g) * 0.1
    W.view(-1)[torch.randperm(W.numel(), generator=g)[:n_outliers]] = 1.0
    return W, X.T @ X / X.shape[0], W.abs() > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_gptq_with_kept_entries_matches_the_textbook_algorithm(seed, bits):
    # The kept entries' stored values are their original weights, so the difference between
    # those and the entries as GPTQ has updated them must be propagated: code for code the same
    # as the reference, which treats a kept entry as one more rounding.
    W, H, keep = outlier_problem(seed)
    scale = choose_scales(W.masked_fill(keep, 0.0), bits)
    codes = gptq_quantize(W, H, bits, scale, keep=keep, act_order=False, block_size=8, damp=0.01)
    assert torch.equal(codes, textbook_gptq(W, H, bits, scale, keep, damp=0.01))


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_with_outliers_has_less_output_error_than_without(bits):
    g = torch.Generator().manual_seed(5)
    W, H = problem(5, d_in=128, d_out=64, n=4096)
    W.view(-1)[torch.randperm(W.numel(), generator=g)[:8]] = 0.4  # a few large weights
    errors = {}
    for k in (0, 8, 64):
        policy = QuantPolicy.uniform(bits, float_max_numel=0, gptq=True, outlier_topk=k)
        q = encode_tensor("mlps.0.fc.weight", W, policy, hessian=H)  # the outliers dequantize to their stored values
        errors[k] = output_error(W, dequantize_tensor(q), H)
    assert errors[64] <= errors[8] <= errors[0], errors


# ------------------------------------------------------------------ Hessians and calibration


def tiny(plan: PlanSpec, seed: int = 0) -> GPT:
    return tiny_model(seed=seed, num_heads=2, num_kv_heads=1, plan=plan)


def test_hessians_accumulate_over_every_use_of_a_shared_layer():
    model = tiny(PlanSpec("cycle", layers=2, loops=3))
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    handle = model.attn[1].c_q.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 32)))
    H = collect_hessians(model, tokens, batch_size=3)
    handle.remove()
    assert len(seen) == 3 * 2  # three loops x two batches
    X = torch.cat(seen)
    torch.testing.assert_close(H["attn.1.c_q.weight"], X.T @ X / X.shape[0])
    assert set(H) == {f"attn.{i}.{p}.weight" for i in range(2) for p in ("c_q", "c_k", "c_v", "proj")} | {
        f"mlps.{i}.{p}.weight" for i in range(2) for p in ("fc", "proj")
    }
    assert H["mlps.0.proj.weight"].shape == (64, 64)
    assert "tok_emb.weight" in collect_hessians(model, tokens, include_embedding=True)
    with pytest.raises(CalibrationError, match="integer tensor"):
        collect_hessians(model, tokens.float())
    with pytest.raises(CalibrationError, match="lie in"):
        collect_hessians(model, tokens + 64)


def test_calibration_tokens_from_training_data_and_from_the_model():
    model = tiny(PlanSpec("vanilla", layers=1))
    stream = np.arange(1000) % 60
    a = calibration_tokens(model, "train", tokens=stream, num_seqs=5, seq_len=12, seed=3)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens(model, "train", tokens=stream, num_seqs=5, seq_len=12, seed=3))
    assert torch.equal(a, calibration_tokens(model, "train", tokens=torch.from_numpy(stream), num_seqs=5, seq_len=12, seed=3))
    assert bool(((a[:, 1:] - a[:, :-1]) % 60 == 1).all())  # contiguous windows of the stream
    s = calibration_tokens(model, "self", num_seqs=3, seq_len=9, seed=0, batch_size=2)
    assert s.shape == (3, 9) and bool((s[:, 0] == 1).all()) and int(s.max()) < 64
    assert torch.equal(s, calibration_tokens(model, "self", num_seqs=3, seq_len=9, seed=0, batch_size=2))
    with pytest.raises(CalibrationError, match="needs the training stream"):
        calibration_tokens(model, "train")
    with pytest.raises(CalibrationError, match="not both"):
        calibration_tokens(model, "train", tokens=stream, shards=["x.bin"])
    with pytest.raises(CalibrationError, match="fewer than seq_len"):
        calibration_tokens(model, "train", tokens=stream[:5], seq_len=12)
    with pytest.raises(CalibrationError, match="1-D integer"):
        calibration_tokens(model, "train", tokens=stream.astype(float))
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        calibration_tokens(model, "val", tokens=stream)


def test_calibration_from_shard_files_equals_calibration_from_the_loaded_stream(tmp_path):
    model = tiny(PlanSpec("vanilla", layers=1))
    rng = np.random.default_rng(0)
    paths = []
    for i, n in enumerate((50, 0, 17, 80)):  # windows of 40 run across shard ends (and an empty shard)
        paths.append(tmp_path / f"fineweb_train_{i:06d}.bin")
        write_shard(paths[-1], rng.integers(0, 64, size=n), vocab_size=64)
    for seed in range(3):
        from_files = calibration_tokens(model, "train", shards=paths, num_seqs=30, seq_len=40, seed=seed)
        loaded = calibration_tokens(model, "train", tokens=load_tokens(paths), num_seqs=30, seq_len=40, seed=seed)
        assert torch.equal(from_files, loaded) and from_files.dtype == torch.long


def test_calibration_from_a_shard_reads_only_its_windows(tmp_path):
    model = tiny(PlanSpec("vanilla", layers=1))
    n = 5_000_000
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 64, size=n, dtype=np.uint16))
    tracemalloc.start()
    try:
        calib = calibration_tokens(model, "train", shards=[path], num_seqs=32, seq_len=128, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calib.shape == (32, 128)
    # The whole stream as int64 would be 40 MB (and loading it 10 MB more); the windows are 32 KB.
    assert peak < 8 * n / 100, peak


# ---------------------------------------------------------------- GPTQ on the output layer


def _output_layer_problem(tie: bool):
    model = tiny_model(seed=2, tie_embeddings=tie)
    if not tie:  # the untied head starts at zero: give it something to code
        torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    tokens = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))
    return model, collect_hessians(model, tokens, include_embedding=True)


@pytest.mark.parametrize("tie", [True, False])
def test_gptq_on_the_output_layer_uses_the_final_hidden_states_hessian(tie):
    model, H = _output_layer_problem(tie)
    name = "tok_emb.weight" if tie else "lm_head.weight"
    X = model.hidden(torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))).reshape(-1, 32)
    torch.testing.assert_close(H[name], X.T @ X / X.shape[0])
    assert ("lm_head.weight" in H) != tie and ("tok_emb.weight" in H) == tie  # an untied input embedding has no Hessian
    W = model.state_dict()[name]
    rounded = encode_tensor(name, W, parse_policy("int5,embed=5,gptq,fp16max=0"), hessian=H[name])
    coded = encode_tensor(name, W, parse_policy("int5,embed=5,gptq,gptq_roles=embed+attn+mlp,fp16max=0"), hessian=H[name])
    assert torch.equal(rounded.scale, coded.scale) and not torch.equal(rounded.data, coded.data)  # same grid, other codes
    assert output_error(W, dequantize_tensor(coded), H[name]) < 0.9 * output_error(W, dequantize_tensor(rounded), H[name])


def test_gptq_on_the_embedding_needs_the_output_layers_hessian_and_leaves_a_lookup_table_rounded(tmp_path):
    from loopgolf.export.pack import export_model, load_model
    from loopgolf.export.quantize import QuantError, encode_state

    policy = parse_policy("int6,gptq,gptq_roles=embed+attn+mlp,fp16max=0")
    model, H = _output_layer_problem(True)
    without = {k: v for k, v in H.items() if k != "tok_emb.weight"}
    with pytest.raises(QuantError, match="no output layer has a Hessian"):
        encode_state(model.state_dict(), policy, hessians=without)
    # Untied: the head is GPTQ'd, the input embedding (no Hessian) is rounded to nearest, as without embed.
    untied, Hu = _output_layer_problem(False)
    state = untied.state_dict()
    qstate, _ = encode_state(state, policy, hessians=Hu)
    plain, _ = encode_state(state, parse_policy("int6,gptq,fp16max=0"), hessians=Hu)
    assert torch.equal(qstate["tok_emb.weight"].data, plain["tok_emb.weight"].data)
    assert not torch.equal(qstate["lm_head.weight"].data, plain["lm_head.weight"].data)
    # export_model gathers the output layer's Hessian itself when the policy asks for it.
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    export_model(model, tmp_path / "e.lgz", policy=policy, codec="lzma", calibration=calib)
    _, loaded = load_model(tmp_path / "e.lgz")
    assert QuantPolicy.from_dict(loaded.meta["quant"]) == policy


@pytest.mark.parametrize(
    "text, message",
    [
        ("gptq_roles=embed+attn", "only applies with GPTQ on"),
        ("gptq,gptq_roles=lora", "gptq_roles must be distinct roles from embed, attn, mlp"),
        ("gptq,gptq_roles=attn+attn", "gptq_roles must be distinct"),
        ("gptq,gptq_roles=", "gptq_roles must be distinct"),
    ],
)
def test_bad_gptq_roles_are_refused(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_gptq_roles_spellings_and_the_default_policy_unchanged():
    a, b = parse_policy("gptq,gptq_roles=mlp+embed+attn"), parse_policy("gptq,gptq_roles=embed+attn+mlp")
    assert a == b and a.gptq_roles == "embed+attn+mlp" and parse_policy(a.describe()) == a
    assert "gptq_roles" not in parse_policy("int6,gptq").to_dict()  # older policies record (and so store) the same bytes
    assert a.uses_gptq("embed") and not parse_policy("gptq").uses_gptq("embed")
