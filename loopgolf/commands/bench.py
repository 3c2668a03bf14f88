"""`loopgolf bench train` (tokens/s, step time, memory and MFU of the training step) and
`loopgolf bench serve` (the serving engines side by side on one request stream, early exit's bpb
cost, and a load test of the server). The measurements live in :mod:`loopgolf.bench`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from loopgolf.commands.args import add_model_overrides, int_list, kv, model_overrides, non_negative_float, non_negative_int, positive_int
from loopgolf.serve.exits import CRITERION_SYNTAX, DEFAULT_EXIT_STATE, EXIT_STATE_HELP, EXIT_STATES

DESCRIPTION: dict[str, str] = {}


def cmd_bench_train(args: argparse.Namespace) -> int:
    from loopgolf.bench.train import bench_json, bench_train, format_bench

    train_set: dict[str, Any] = dict(args.train_set)
    for flag, key in (("seq_len", "seq_len"), ("batch_tokens", "batch_tokens"), ("micro_batch_tokens", "micro_batch_tokens")):
        if getattr(args, flag) is not None:
            train_set[key] = getattr(args, flag)
    if args.compile:
        train_set["compile"] = True
    result = bench_train(
        args.preset,
        model_overrides=model_overrides(args),
        train_overrides=train_set,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        peak_size=args.peak_size,
        threads=args.threads,
    )
    print(bench_json(result) if args.json else format_bench(result))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from loopgolf.bench.serve import StreamSpec, bench_serve, format_bench_serve

    for flag, pair in (("--prompt-len", args.prompt_len), ("--output-len", args.output_len)):
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ValueError(f"{flag} takes MIN,MAX with MIN <= MAX, got {','.join(map(str, pair))}")
    spec = StreamSpec(args.requests, tuple(args.prompt_len), tuple(args.output_len), args.arrival_rate, args.seed)
    r = bench_serve(
        args.model,
        tokenizer=args.tokenizer,
        data=args.data,
        criterion=args.early_exit,
        exit_state=args.exit_state,
        device=args.device or "cpu",
        spec=spec,
        slots=args.slots,
        eval_tokens=args.eval_tokens,
        server_requests=args.server_requests,
        concurrency=args.concurrency,
        threads=args.threads,
        repeats=args.repeats,
    )
    print(format_bench_serve(r))
    if args.json:
        print(json.dumps(r))
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    from loopgolf.config import DEFAULT_PRESET, PRESETS

    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="{train,serve}")
    t = bsub.add_parser(
        "train",
        help="tokens/s, step time, memory and MFU of the training step on synthetic tokens",
        description="Run the trainer on synthetic tokens (warm-up steps, then measured steps) and report tokens/s, step time, "
        "memory and MFU = 3 x forward FLOPs/token (from the plan) x tokens/s / the matmul peak measured in the same process "
        "(float32 on CPU, bf16 on CUDA). With --json the result is one JSON line.",
    )
    t.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"configuration to measure (default {DEFAULT_PRESET})")
    t.add_argument("--steps", type=positive_int, default=10, help="measured steps (default 10)")
    t.add_argument("--warmup", type=non_negative_int, default=3, help="unmeasured steps first (default 3)")
    t.add_argument("--device", help="auto, cpu or cuda")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; on CPU it needs a C++ compiler)")
    t.add_argument("--seq-len", type=positive_int, help="training sequence length")
    t.add_argument("--batch-tokens", type=positive_int, help="global tokens per optimizer step")
    t.add_argument("--micro-batch-tokens", type=positive_int, help="tokens per forward (gradient accumulation)")
    t.add_argument("--peak-size", type=positive_int, help="n of the n x n peak matmul (default 2048 on CPU, 8192 on CUDA)")
    t.add_argument("--threads", type=positive_int, help="CPU threads for training and the peak (default: torch's)")
    t.add_argument("--train", dest="train_set", type=kv, action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    add_model_overrides(t)
    t.add_argument("--json", action="store_true", help="print the result as one JSON line")
    t.set_defaults(func=cmd_bench_train)

    s = bsub.add_parser(
        "serve",
        help="tokens/s and latency of static, sequence and depth-wise batching; early exit's bpb cost; a server load test",
        description="Serve one request stream (prompts cut from the validation tokens, greedy) on the static full-depth, "
        "sequence-level continuous and continuous depth-wise engines (and sequence batching with early exit, to separate the "
        "two effects); score val_bpb with and without early exit; load-test `loopgolf serve` from a second process. "
        "Every speedup is the median of within-round ratios, printed with its min-max over the rounds. "
        "With --json the last line is the JSON result.",
    )
    s.add_argument("model", metavar="MODEL", help="a recursive model: an artifact, a run or `loopgolf convert` directory, or a checkpoint")
    s.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    s.add_argument("--data", help="dataset for prompts and scoring (default: the run's)")
    s.add_argument(
        "--early-exit", metavar="CRITERION", help=f"{CRITERION_SYNTAX} (default: agree on plans of 3 or more passes, where it can fire; maxprob:0.5 on 2)"
    )
    s.add_argument("--exit-state", choices=EXIT_STATES, default=DEFAULT_EXIT_STATE, help=EXIT_STATE_HELP)
    s.add_argument("--device", help="cpu (default) or cuda: where the engines run")
    s.add_argument("--requests", type=positive_int, default=32, help="requests in the stream (default 32)")
    s.add_argument("--prompt-len", type=int_list, default=[16, 96], metavar="MIN,MAX", help="prompt tokens (default 16,96)")
    s.add_argument("--output-len", type=int_list, default=[16, 64], metavar="MIN,MAX", help="generated tokens (default 16,64)")
    s.add_argument("--arrival-rate", type=non_negative_float, default=0.0, help="Poisson arrivals per second (default 0: all at once)")
    s.add_argument("--slots", type=positive_int, default=8, help="requests decoded at once (default 8)")
    s.add_argument("--eval-tokens", type=positive_int, default=16384, help="validation tokens for the bpb cost (default 16384)")
    s.add_argument("--server-requests", type=non_negative_int, default=16, help="requests in the server load test (0: skip it; default 16)")
    s.add_argument("--concurrency", type=positive_int, default=4, help="client threads in the load test (default 4)")
    s.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    s.add_argument("--repeats", type=positive_int, default=3, help="rounds of the four engines; medians reported (default 3)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="request stream seed")
    s.add_argument("--json", action="store_true", help="print the result as one JSON line")
    s.set_defaults(func=cmd_bench_serve)
