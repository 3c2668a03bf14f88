"""`loopgolf generate` (text from a model, streamed) and `loopgolf serve` (an OpenAI-style
completions server on a continuous-batching engine)."""

from __future__ import annotations

import argparse
import json
import sys

from loopgolf.commands.args import LOOPS_HELP, non_negative_float, non_negative_int, positive_float, positive_int
from loopgolf.serve.exits import CRITERION_SYNTAX, DEFAULT_EXIT_STATE, EXIT_STATE_HELP, EXIT_STATES

DESCRIPTION = {
    "serve": "Serve POST /v1/completions (stream via server-sent events), GET /v1/models and GET /health with "
    "starlette + uvicorn. Requests share one engine (continuous depth-wise batching by default); a full queue "
    "answers 429, a request past --timeout 504; SIGTERM finishes in-flight requests for --shutdown-grace seconds.",
}
MAX_SLOTS = 4096  # far above what one engine batches usefully; a typo (1e9) fails here, not in the allocator


def _open(args: argparse.Namespace):
    from loopgolf.device import resolve_device
    from loopgolf.serve.exits import check_fires, parse_criterion
    from loopgolf.sources.open import open_for_text

    criterion = parse_criterion(args.early_exit) if args.early_exit else None
    if criterion is None and args.exit_state is not None:
        raise ValueError("--exit-state says what an exited token leaves behind; it needs --early-exit")
    served = open_for_text(args.model, args.tokenizer, resolve_device(args.device or "auto"))
    if args.loops is not None:
        served.model.set_loops(args.loops)
    if criterion is not None:
        check_fires(criterion, served.model)
    return served, criterion


def cmd_generate(args: argparse.Namespace) -> int:
    from loopgolf.serve.generate import Generator

    served, criterion = _open(args)
    gen = Generator(served.model, served.tokenizer, criterion=criterion, exit_state=args.exit_state or DEFAULT_EXIT_STATE)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    if args.json:
        g = gen.generate(args.prompt, args.max_new_tokens, **kwargs)
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "text": g.text,
                    "token_ids": g.token_ids,
                    "loops": g.loops,
                    "mean_loops": g.mean_loops,
                    "finish_reason": g.finish_reason,
                    "prompt_tokens": g.prompt_tokens,
                }
            )
        )
        return 0
    sys.stdout.write(args.prompt)
    for event in gen.stream(args.prompt, args.max_new_tokens, **kwargs):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    g = gen.last_request
    sys.stdout.write("\n")
    print(f"[{len(g.generated)} tokens, finish: {g.finish_reason}, mean passes/token {sum(g.loops) / max(1, len(g.loops)):.2f}]", file=sys.stderr)
    return 0


def kv_cache_bytes(model, slots: int, context: int) -> int:
    """Bytes of the engine's KV cache: keys and values per (layer step, slot, position)."""
    cfg = model.config
    itemsize = next(model.parameters()).element_size()
    return 2 * len(model.active_layers) * slots * context * cfg.num_kv_heads * cfg.head_dim * itemsize


def _memory_bytes() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_listen(host: str, port: int) -> None:
    """OSError (one line) when ``host:port`` cannot be listened on (in use, or not an address of
    this machine), before the model is loaded; uvicorn would log it and exit 3."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(address)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from loopgolf.serve.engine import Engine
    from loopgolf.serve.server import ServerConfig, serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise ValueError(f"--host {args.host} would listen beyond this machine; pass --allow-remote if that is meant")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.slots > MAX_SLOTS:
        raise ValueError(f"--slots {args.slots:,} is more than {MAX_SLOTS:,}")
    _check_listen(args.host, args.port)
    served, criterion = _open(args)
    model = served.model
    context = args.context or min(served.opened.seq_len, model.config.max_seq_len)
    if context > model.config.max_seq_len:
        raise ValueError(f"--context {context:,} is longer than the model's max_seq_len {model.config.max_seq_len:,}")
    need, have = kv_cache_bytes(model, args.slots, context), _memory_bytes()
    if have is not None and need > have // 2:
        raise ValueError(
            f"--slots {args.slots} x --context {context} needs a {need / 2**30:.1f} GiB KV cache, more than half of this "
            f"machine's {have / 2**30:.1f} GiB; lower --slots or --context"
        )
    try:
        engine = Engine(
            model,
            schedule=args.schedule,
            slots=args.slots,
            max_len=context,
            criterion=criterion,
            exit_state=args.exit_state or DEFAULT_EXIT_STATE,
            decode=served.tokenizer.decode,
            max_queue=args.max_queue,
        )
    except (RuntimeError, MemoryError) as e:  # the KV cache could not be allocated after all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--slots {args.slots} x --context {context}: the KV cache ({need / 2**30:.2f} GiB) could not be allocated: {first}") from None
    cfg = ServerConfig(
        args.name or served.opened.name,
        args.host,
        args.port,
        args.timeout,
        args.shutdown_grace,
        read_timeout=args.read_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    print(
        f"serving {cfg.model_name} ({served.opened.path}) on http://{cfg.host}:{cfg.port}/v1 — schedule {args.schedule}, "
        f"{args.slots} slots, context {engine.max_len}, early exit {f'{criterion} ({args.exit_state or DEFAULT_EXIT_STATE})' if criterion else 'off'}"
        + (f", {args.loops} loops" if args.loops is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    serve(engine, served.tokenizer, cfg)
    return 0


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="an artifact, a run directory, a `loopgolf convert` directory or a checkpoint")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one of the data the run trained on)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--early-exit", metavar="CRITERION", help=f"stop a token after a pass of a recursive plan when: {CRITERION_SYNTAX} (default: full depth)")
    p.add_argument("--exit-state", choices=EXIT_STATES, help=f"with --early-exit: {EXIT_STATE_HELP}")
    p.add_argument("--loops", type=positive_int, help=f"run the looped block(s) of a recursive plan N times instead of the trained count ({LOOPS_HELP})")


def register(name: str, p: argparse.ArgumentParser) -> None:
    _add_model_source(p)
    if name == "generate":
        p.add_argument("--prompt", required=True, help="the text to continue")
        p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most (default 64)")
        p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0: greedy (default 1)")
        p.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely tokens (0: all)")
        p.add_argument("--top-p", type=positive_float, default=1.0, help="nucleus sampling mass (default 1: all)")
        p.add_argument("--seed", type=non_negative_int, help="sampling seed (default: random)")
        p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the text")
        p.set_defaults(func=cmd_generate)
        return
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1, this machine only)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other than localhost")
    p.add_argument("--name", help="the model id clients ask for (default: the run directory's name)")
    p.add_argument("--schedule", choices=("depthwise", "sequence", "static"), default="depthwise", help="engine schedule (default depthwise)")
    p.add_argument("--slots", type=positive_int, default=8, help="requests decoded at once (default 8)")
    p.add_argument("--context", type=positive_int, help="prompt + completion tokens per request (default: the training seq_len)")
    p.add_argument("--max-queue", type=non_negative_int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds a request may take, queueing and reading its body included (default 120)")
    p.add_argument(
        "--read-timeout",
        type=positive_float,
        default=10.0,
        help="seconds a client gets to send a request's headers, and its body (default 10, at most --timeout); a half-sent request is then closed (408)",
    )
    p.add_argument(
        "--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body; a larger one is refused before it is read (413; default 1 MiB)"
    )
    p.add_argument("--shutdown-grace", type=non_negative_float, default=10.0, help="seconds in-flight requests get on SIGTERM (default 10)")
    p.set_defaults(func=cmd_serve)
