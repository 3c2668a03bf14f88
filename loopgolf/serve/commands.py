"""`loopgolf generate`, `loopgolf serve` and `loopgolf eval --early-exit`: the command functions
(their parsers live in loopgolf.cli, which imports this module only when one runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from loopgolf.device import resolve_device
from loopgolf.serve.exits import parse_criterion
from loopgolf.serve.load import load_served


def cmd_generate(args: argparse.Namespace) -> int:
    from loopgolf.serve.generate import Generator

    served = load_served(args.model, args.tokenizer, resolve_device(args.device or "auto"))
    criterion = parse_criterion(args.early_exit) if args.early_exit else None
    gen = Generator(served.model, served.tokenizer, criterion=criterion)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    if args.json:
        g = gen.generate(args.prompt, args.max_new_tokens, **kwargs)
        print(json.dumps({"prompt": args.prompt, "text": g.text, "token_ids": g.token_ids, "loops": g.loops, "mean_loops": g.mean_loops,
                          "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens}))
        return 0
    sys.stdout.write(args.prompt)
    for event in gen.stream(args.prompt, args.max_new_tokens, **kwargs):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    g = gen.last_request
    sys.stdout.write("\n")
    print(f"[{len(g.generated)} tokens, finish: {g.finish_reason}, mean passes/token {sum(g.loops) / max(1, len(g.loops)):.2f}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from loopgolf.serve.engine import Engine
    from loopgolf.serve.server import ServerConfig, serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise ValueError(f"--host {args.host} would listen beyond this machine; pass --allow-remote if that is meant")
    served = load_served(args.model, args.tokenizer, resolve_device(args.device or "auto"))
    criterion = parse_criterion(args.early_exit) if args.early_exit else None
    engine = Engine(
        served.model, schedule=args.schedule, slots=args.slots, max_len=min(args.context or served.seq_len, served.model.config.max_seq_len),
        criterion=criterion, decode=served.tokenizer.decode, max_queue=args.max_queue,
    )
    cfg = ServerConfig(args.name or served.name, args.host, args.port, args.timeout, args.shutdown_grace)
    print(f"serving {cfg.model_name} ({served.artifact}) on http://{cfg.host}:{cfg.port}/v1 — schedule {args.schedule}, "
          f"{args.slots} slots, context {engine.max_len}, early exit {criterion or 'off'}", file=sys.stderr, flush=True)
    serve(engine, served.tokenizer, cfg)
    return 0


def cmd_eval_early_exit(args: argparse.Namespace) -> int:
    """`loopgolf eval ARTIFACT --early-exit CRITERION`: val_bpb with early exit and the mean passes per token."""
    from loopgolf.data.dataset import Dataset
    from loopgolf.export.pack import load_model
    from loopgolf.serve.scoring import evaluate_early_exit

    if args.stride is not None:
        raise ValueError("--early-exit scores non-overlapping windows only; leave out --stride")
    criterion = parse_criterion(args.early_exit)
    device = resolve_device(args.device or "auto")
    model, loaded = load_model(Path(args.artifact), device=device)
    if not model.loop_exits() and criterion.fires:
        raise ValueError(f"the artifact's plan ({model.plan.describe()}) has a single pass: there is nowhere to exit early")
    data = Dataset.open(Path(args.data), tokenizer=Path(args.tokenizer) if args.tokenizer else None, verify=not args.no_verify_data, splits=("val",))
    if data.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {data.vocab_size} pieces but the model's vocabulary is {model.config.vocab_size}")
    seq_len = args.seq_len or int(loaded.meta.get("seq_len", 1024))
    with torch.inference_mode():
        r = evaluate_early_exit(model, data.val_tokens(), data.tables, seq_len, criterion, batch_size=args.batch_size,
                                max_tokens=args.max_tokens, progress=not args.json)
    out = {**r.to_dict(), "artifact": str(args.artifact), "data": str(args.data)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"val_bpb {r.val_bpb:.6f}  val_loss {r.val_loss:.6f}  early exit {r.criterion}: mean passes/token {r.mean_loops:.3f} of {r.full_loops}  "
              f"(per pass {r.loop_histogram})  targets {r.num_targets:,}  bytes {r.target_bytes:,}")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from loopgolf.bench.serve import StreamSpec, bench_serve, format_bench_serve

    for flag, pair in (("--prompt-len", args.prompt_len), ("--output-len", args.output_len)):
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ValueError(f"{flag} takes MIN,MAX with MIN <= MAX, got {','.join(map(str, pair))}")
    if args.arrival_rate < 0:
        raise ValueError(f"--arrival-rate must be >= 0, got {args.arrival_rate}")
    spec = StreamSpec(args.requests, tuple(args.prompt_len), tuple(args.output_len), args.arrival_rate, args.seed)
    r = bench_serve(args.model, tokenizer=args.tokenizer, data=args.data, criterion=args.early_exit, spec=spec, slots=args.slots,
                    eval_tokens=args.eval_tokens, server_requests=args.server_requests, concurrency=args.concurrency, threads=args.threads, repeats=args.repeats)
    print(format_bench_serve(r))
    if args.json:
        print(json.dumps(r))
    return 0
