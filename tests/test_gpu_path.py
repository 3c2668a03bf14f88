"""The GPU training path: one compiled graph per recurrence stage (checked on CPU with the eager
backend, which guards and recompiles exactly like inductor), and CUDA-only checks that skip
without a GPU: no host sync inside a step, compiled bf16 training across stage switches,
and NCCL data parallelism."""

from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from helpers import markov_tokens, tiny_model
from torch._dynamo.utils import counters

from loopgolf.config import get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec
from loopgolf.train.optim import build_optimizers
from loopgolf.train.trainer import compile_model, run_step, train, warm_up_compiled

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def staged_model(**kw) -> GPT:
    return tiny_model(
        seed=0, num_heads=2, num_kv_heads=1, per_layer_controls=True, plan=PlanSpec("mini-loop", layers=3, loops=2, loop_start=1, loop_end=1), **kw
    )


@pytest.mark.parametrize("extra", [{}, {"lora_ranks": {"q": 2, "mlp_in": 2}, "depth_embeddings": True}])
def test_one_full_graph_per_stage_and_no_recompiles(extra):
    torch._dynamo.reset()
    model = staged_model(**extra)
    step_fn = compile_model(model, backend="eager")  # fullgraph: a graph break is an error
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = counters["stats"]["unique_graphs"]
    warm_up_compiled(step_fn, model, [0, 1, 2], x, nullcontext())
    assert counters["stats"]["unique_graphs"] - before == 3
    optimizers = build_optimizers(model, get_preset("debug").train.optim, tied=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for stage in (0, 1, 2, 1, 0):
            model.set_stage(stage)
            xs = torch.cat([x, x.flip(0)])  # two micro-batches of the warmed-up shape
            loss = run_step(
                step_fn, model, optimizers, xs, xs.roll(1, dims=1), accum=2, amp=nullcontext(), world_size=1, grad_clip=1.0, device=torch.device("cpu")
            )
            assert torch.isfinite(loss)
    torch._dynamo.reset()


@cuda_only
def test_cuda_step_has_no_host_sync():
    device = torch.device("cuda")
    model = staged_model().to(device)
    optimizers = build_optimizers(model, get_preset("debug").train.optim, tied=True)
    xs = torch.randint(0, 64, (4, 32))
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    kw = dict(accum=2, amp=amp, world_size=1, grad_clip=1.0, device=device)
    run_step(model, model, optimizers, xs, xs, **kw)  # first step: optimizer state allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = run_step(model, model, optimizers, xs, xs, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@cuda_only
def test_cuda_compiled_training_switches_stages_without_recompiling(tmp_path):
    torch._dynamo.reset()
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(20_000, vocab=64))
    model = staged_model().to("cuda")
    tcfg = replace(get_preset("debug").train, max_steps=12, recurrence_stages=[0.3, 0.6], compile=True, log_every=4, device="cuda")
    before = counters["stats"]["unique_graphs"]
    r = train(model, TokenLoader([path], tcfg.seq_len), tcfg, device=torch.device("cuda"), progress=False)
    assert r.stage_steps == [0, 4, 8] and len(r.losses) == 12
    assert counters["stats"]["unique_graphs"] - before == 3  # compiled once per stage, before the clock
    assert r.losses[-1] < r.losses[0]
    torch._dynamo.reset()


@cuda_only
def test_cuda_compiled_qat_switches_on_without_recompiling(tmp_path):
    from loopgolf.train.qat import QAT, QATConfig

    torch._dynamo.reset()
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, markov_tokens(20_000, vocab=64))
    model = staged_model().to("cuda")
    qat = QAT(model, QATConfig(mode="noise", bits=6, float_max_numel=0, start_frac=0.5))
    tcfg = replace(get_preset("debug").train, max_steps=8, compile=True, log_every=4, device="cuda")
    before = counters["stats"]["unique_graphs"]
    r = train(model, TokenLoader([path], tcfg.seq_len), tcfg, device=torch.device("cuda"), on_step=qat, forward=qat.forward, progress=False)
    assert qat.start_step == 4 and len(r.losses) == 8
    assert counters["stats"]["unique_graphs"] - before == 1  # as without QAT: compiled once, before the clock
    torch._dynamo.reset()


@cuda_only
def test_cuda_bench_reports_bf16_peak():
    from loopgolf.bench.train import bench_train

    r = bench_train("debug", steps=2, warmup=1, device="cuda", peak_size=2048)
    assert r["peak_dtype"] == "bfloat16" and r["memory_kind"] == "cuda_max_allocated"
    assert 0 < r["mfu"] < 1 and r["memory_bytes"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_nccl_ranks_train_like_one_process(text_dataset, tmp_path):
    from test_distributed import launch

    from loopgolf.cli import main
    from loopgolf.train.checkpoint import read_checkpoint

    args = ["train", "--preset", "debug", "--data", str(text_dataset), "--device", "cuda", "--steps", "4", "--seed", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    launch(2, [*args, "--out", str(tmp_path / "two")])
    one, two = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    # bf16 autocast: looser than the float32 CPU comparison.
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=2e-2)
