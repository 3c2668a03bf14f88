"""The `loopgolf` command: one entry point, a subcommand table, each subcommand a plain function.

Tests call the ``cmd_*`` functions (or :func:`main` with an argv list) directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from loopgolf.export.pack import DEFAULT_CAP_BYTES
from loopgolf.model.plan import PLAN_SYNTAX

if TYPE_CHECKING:
    from loopgolf.run import RunOptions


def _kv(text: str) -> tuple[str, Any]:
    """Parse KEY=VALUE with a JSON value (bare words stay strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _lora_ranks(text: str) -> dict[str, int]:
    """'all=8' or 'q=4,v=4' -> {target: rank}."""
    from loopgolf.model.gpt import LORA_TARGETS, UNGATED_TARGETS

    ranks: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected TARGET=RANK items, got {item!r}")
        targets = UNGATED_TARGETS if name == "all" else (name,)  # a gated MLP's mlp_gate is named
        for t in targets:
            if t not in LORA_TARGETS:
                raise argparse.ArgumentTypeError(f"unknown LoRA target {t!r}; valid: all, {', '.join(LORA_TARGETS)}")
            ranks[t] = int(value)
    return ranks


# ------------------------------------------------------------------------- run


def add_model_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model overrides (on top of the preset)")
    g.add_argument("--plan", help="depth plan: " + PLAN_SYNTAX)
    g.add_argument("--dim", type=_positive_int, help="model width")
    g.add_argument("--heads", type=_positive_int, help="attention heads")
    g.add_argument("--kv-heads", type=_positive_int, help="key/value heads (GQA)")
    g.add_argument("--mlp-mult", type=_positive_int, help="MLP hidden = mlp_mult * width")
    g.add_argument("--per-layer-controls", action="store_true", default=None, help="unshared scales/mixes/q gains per virtual layer")
    g.add_argument("--depth-emb", action="store_true", default=None, help="a learned embedding added at the start of each virtual layer")
    g.add_argument("--lora", type=_lora_ranks, metavar="RANKS", help="per-virtual-layer LoRA: 'all=8' or 'q=4,v=4,mlp_in=16' (targets q,k,v,o,mlp_in,mlp_out, and mlp_gate for gated MLPs; all = the first six)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale alpha/r (default: alpha = r)")
    g.add_argument("--model", dest="model_set", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="any ModelConfig field")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from loopgolf.model.plan import parse_plan

    out: dict[str, Any] = dict(args.model_set)
    if args.plan:
        out["plan"] = parse_plan(args.plan).to_dict()
    for flag, key in (
        ("dim", "model_dim"), ("heads", "num_heads"), ("kv_heads", "num_kv_heads"), ("mlp_mult", "mlp_mult"),
        ("per_layer_controls", "per_layer_controls"), ("depth_emb", "depth_embeddings"), ("lora", "lora_ranks"), ("lora_alpha", "lora_alpha"),
    ):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    return out


# Flags that shape the model, data order or export: a resumed run takes them from its
# config.json, so giving them with --resume is a mistake worth reporting.
_RESUME_FIXED = (
    ("preset", "--preset"), ("out", "--out"), ("cap", "--cap"), ("seed", "--seed"), ("seq_len", "--seq-len"),
    ("batch_tokens", "--batch-tokens"), ("codec", "--codec"), ("quant", "--quant"), ("qat", "--qat"), ("qat_start", "--qat-start"), ("stride", "--stride"), ("train_set", "--train"),
    ("plan", "--plan"), ("dim", "--dim"), ("heads", "--heads"), ("kv_heads", "--kv-heads"), ("mlp_mult", "--mlp-mult"),
    ("per_layer_controls", "--per-layer-controls"), ("depth_emb", "--depth-emb"), ("lora", "--lora"),
    ("lora_alpha", "--lora-alpha"), ("model_set", "--model"), ("force", "--force"),
    ("init_from", "--init-from"), ("distill_from", "--distill-from"),
)


def run_options(args: argparse.Namespace, train_only: bool = False) -> RunOptions:
    from loopgolf.config import DEFAULT_PRESET
    from loopgolf.run import RunOptions

    if args.resume:
        given = [flag for dest, flag in _RESUME_FIXED if getattr(args, dest) not in (None, [], False)]
        if given:
            raise ValueError(
                f"--resume continues the run with its stored config.json; drop {', '.join(given)} "
                "(only --steps, --time, --device, --data and --checkpoint-every may change)"
            )
    train_set: dict[str, Any] = dict(args.train_set)
    if args.seq_len is not None:
        train_set["seq_len"] = args.seq_len
    if args.batch_tokens is not None:
        train_set["batch_tokens"] = args.batch_tokens
    return RunOptions(
        preset=args.preset or DEFAULT_PRESET,
        data=Path(args.data) if args.data else None,
        out=Path(args.out) if args.out else None,
        cap_bytes=DEFAULT_CAP_BYTES if args.cap is None else args.cap,
        seed=args.seed,
        time_budget=args.time,
        max_steps=args.steps,
        codec=args.codec or "auto",
        quant=args.quant or "",
        qat=args.qat or "off",
        qat_start=0.85 if args.qat_start is None else args.qat_start,
        stride=args.stride,
        device=args.device,
        model_overrides=model_overrides(args),
        train_overrides=train_set,
        progress=not args.json and not args.quiet,
        force=args.force,
        checkpoint_every=args.checkpoint_every,
        resume=Path(args.resume) if args.resume else None,
        train_only=train_only,
        verify_data=not args.no_verify_data,
        init_from=Path(args.init_from) if args.init_from else None,
        distill_from=Path(args.distill_from) if args.distill_from else None,
        distill_weight=args.distill_weight,
        distill_temp=args.distill_temp,
        exit_loss_weight=args.exit_loss_weight,
    )


EXIT_BAD_INPUT = 2  # a user mistake or a bad file: one line on stderr
EXIT_OVER_CAP = 3  # the run finished and wrote its report, but code + model exceed the cap


def cmd_run(args: argparse.Namespace) -> int:
    from loopgolf.run import format_summary, run, summary_json

    summary = run(run_options(args))
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return 0
    print(summary_json(summary) if args.json else format_summary(summary))
    if not summary["fits"]:
        print(
            f"loopgolf run: artifact is {summary['artifact_bytes']:,} bytes, over the {summary['cap_bytes']:,}-byte cap "
            f"by {-summary['headroom_bytes']:,} (report written to {summary['run_dir']})",
            file=sys.stderr,
        )
        return EXIT_OVER_CAP
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loopgolf.run import format_train_summary, run, summary_json

    summary = run(run_options(args, train_only=True))
    if summary.get("rank", 0) != 0:
        return 0
    print(summary_json(summary) if args.json else format_train_summary(summary))
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options `run` and `train` share."""
    from loopgolf.config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), help=f"configuration to start from (default {DEFAULT_PRESET})")
    p.add_argument("--data", help="dataset directory (shards + tokenizer); default: the embedded Python-docs corpus")
    p.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument("--cap", type=int, help="artifact byte cap (default 16,000,000)")
    p.add_argument(
        "--time", type=float,
        help="training wallclock budget in seconds; on a preset that stops on steps alone (the default cpu: 250 steps) "
        "it replaces that stop, elsewhere the preset's step cap stays; with --steps, whichever comes first",
    )
    p.add_argument("--steps", type=_positive_int, help="training step budget (the default preset: 250)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--seq-len", type=_positive_int, help="training/eval sequence length")
    p.add_argument("--batch-tokens", type=_positive_int, help="global tokens per optimizer step")
    p.add_argument("--codec", help="artifact compression: auto (smallest, default), zlib, lzma, zstd, brotli")
    p.add_argument("--quant", metavar="POLICY", help="quantization policy, e.g. int6 or attn=6,mlp=5,embed=8,gptq (default: the int8 baseline)")
    p.add_argument("--qat", choices=("off", "ste", "noise"), help="loop-aware QAT on the shared block matrices over the end of training (default off)")
    p.add_argument("--qat-start", type=float, help="fraction of the budget after which QAT is on (default 0.85)")
    p.add_argument("--stride", type=_positive_int, help="sliding-window stride for the final scores (default: non-overlapping)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--train", dest="train_set", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    add_model_overrides(p)
    u = p.add_argument_group("uptraining (after `loopgolf convert`)")
    u.add_argument("--init-from", metavar="SOURCE", help="start from this model: a `loopgolf convert` or run directory, an artifact, or a Hugging Face directory")
    u.add_argument("--distill-from", metavar="SOURCE", help="teacher for forward-KL distillation (any source `loopgolf convert` reads)")
    u.add_argument("--distill-weight", type=float, default=0.5, metavar="W", help="loss = (1 - W) CE + W T^2 KL(teacher || student) (default 0.5)")
    u.add_argument("--distill-temp", type=float, default=1.0, metavar="T", help="distillation temperature (default 1)")
    u.add_argument("--exit-loss-weight", type=float, default=0.0, metavar="W", help="weight of the intermediate-loop losses that prepare early exit (e.g. 0.1)")
    g = p.add_argument_group("checkpoints and resume")
    g.add_argument("--checkpoint-every", type=_non_negative_int, metavar="N", help="write DIR/checkpoint.pt every N steps and when the budget ends (0: none; `train` always writes the final one)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, with its config.json (--steps/--time extend the budget)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bars)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty run directory (its old summary, artifact and checkpoint are removed first)")
    p.add_argument("--no-verify-data", action="store_true", help="skip checking the shards against the dataset's manifest (sizes and sha256)")


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="data -> train -> export -> roundtrip eval -> summary", description="Train a model, export it under the byte cap and score it before and after the roundtrip. Under torchrun, trains data-parallel on every rank.")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_run)
    t = sub.add_parser("train", help="data -> train -> checkpoint (no export); resume or finish with `run --resume`", description="Train only: the options of `run`, stopping after training with DIR/checkpoint.pt. `loopgolf run --resume DIR` then exports and scores it (or trains on with --steps/--time).")
    _add_run_arguments(t)
    t.set_defaults(func=cmd_train)


# ------------------------------------------------------------------------ eval


def cmd_eval(args: argparse.Namespace) -> int:
    if args.early_exit:
        return _lazy_command("loopgolf.serve.commands", "cmd_eval_early_exit")(args)
    import torch

    from loopgolf.evaluate import evaluate_bpb
    from loopgolf.export.pack import load_model
    from loopgolf.data.dataset import Dataset
    from loopgolf.device import resolve_device

    device = resolve_device(args.device or "auto")
    model, loaded = load_model(Path(args.artifact), device=device)
    ds = Dataset.open(Path(args.data), tokenizer=Path(args.tokenizer) if args.tokenizer else None, verify=not args.no_verify_data, splits=("val",))
    if ds.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {ds.vocab_size} pieces but the model's vocabulary is {model.config.vocab_size}")
    seq_len = args.seq_len or int(loaded.meta.get("seq_len", 1024))
    with torch.no_grad():
        r = evaluate_bpb(model, ds.val_tokens(), ds.tables, seq_len, stride=args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens, device=device, progress=not args.json)
    out = {**r.to_dict(), "artifact": str(args.artifact), "artifact_file_bytes": loaded.info.total_bytes, "codec": loaded.codec, "data": str(args.data)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"val_bpb {r.val_bpb:.6f}  val_loss {r.val_loss:.6f}  targets {r.num_targets:,}  bytes {r.target_bytes:,}  (seq_len {r.seq_len}, stride {r.stride})")
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score an artifact on a dataset's validation split (official val_bpb)")
    p.add_argument("artifact", help="artifact file written by `loopgolf run`")
    p.add_argument("--data", required=True, help="dataset directory with fineweb_val_*.bin")
    p.add_argument("--tokenizer", help="SentencePiece model (default: found next to the data)")
    p.add_argument("--seq-len", type=_positive_int, help="evaluation window (default: the training seq_len stored in the artifact)")
    p.add_argument("--stride", type=_positive_int, help="sliding-window stride (default: non-overlapping windows)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--no-verify-data", action="store_true", help="skip checking the validation shards against the dataset's manifest")
    p.add_argument("--max-tokens", type=_positive_int, help="score only this many validation tokens (a cheaper estimate; the official score uses all)")
    p.add_argument("--early-exit", metavar="CRITERION", help=f"score with early exit after each pass of a recursive plan, token by token through the KV cache: {CRITERION_SYNTAX}; "
                   "reports val_bpb and the mean passes per token (non-overlapping windows)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


# ------------------------------------------------------------------------ data


def cmd_data_build(args: argparse.Namespace) -> int:
    from loopgolf.data.corpus import build_dataset

    manifest = build_dataset(
        args.input, Path(args.out), vocab_size=args.vocab_size, tokenizer=args.tokenizer, val_docs=args.val_docs,
        val_fraction=args.val_fraction, seed=args.seed, byte_fallback=not args.no_byte_fallback, shuffle=not args.keep_order,
        force=args.force, progress=not args.json,
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        for split, s in manifest["splits"].items():
            print(f"{split:5s}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['text_bytes']:,} text bytes, {len(s['shards'])} shard(s)")
        order = f"shuffled (seed {manifest['shuffle_seed']})" if manifest["train_order"] == "shuffled" else "in source order"
        print(f"wrote {args.out} (vocab {manifest['vocab_size']}, tokenizer {manifest['tokenizer']}, train documents {order})")
    return 0


def cmd_data_fineweb(args: argparse.Namespace) -> int:
    from loopgolf.data.fineweb import download_fineweb

    path = download_fineweb(Path(args.out), variant=args.variant, train_shards=args.train_shards, endpoint=args.endpoint, progress=True)
    print(f"FineWeb {args.variant} ready in {path}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from loopgolf.data.stats import dataset_stats, format_stats

    paths = [Path(p) for p in args.paths]
    stats = dataset_stats(paths if len(paths) > 1 else paths[0], tokenizer=args.tokenizer)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_data_default(args: argparse.Namespace) -> int:
    from loopgolf.data.default_corpus import default_corpus_description, ensure_default_dataset

    path = ensure_default_dataset(vocab_size=args.vocab_size, progress=True)
    print(default_corpus_description())
    print(path)
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build, fetch and inspect datasets (official shard format)")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{build,fineweb,stats,default}")

    b = dsub.add_parser("build", help="text/jsonl files or folders -> tokenizer + train/val shards + manifest")
    b.add_argument("--input", nargs="+", required=True, help=".txt files (one document each), .jsonl files ({\"text\": ...} per line) or folders")
    b.add_argument("--out", required=True, help="output dataset directory")
    tok = b.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=_positive_int, default=1024, help="train a SentencePiece BPE tokenizer of this size (default 1024)")
    tok.add_argument("--tokenizer", help="use this SentencePiece model instead of training one")
    val = b.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=_positive_int, help="hold out this many documents for validation")
    val.add_argument("--val-fraction", type=float, help="hold out this fraction of documents (default 0.05)")
    b.add_argument("--seed", type=int, default=1337, help="seeds the validation choice, the train shuffle and tokenizer training")
    b.add_argument("--keep-order", action="store_true", help="keep the training documents in source order (default: shuffled with --seed; validation keeps source order either way)")
    b.add_argument("--no-byte-fallback", action="store_true", help="train the tokenizer without byte-fallback pieces")
    b.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    b.add_argument("--json", action="store_true", help="print the manifest")
    b.set_defaults(func=cmd_data_build)

    f = dsub.add_parser("fineweb", help="fetch the official cached FineWeb shards + tokenizer (resumable)")
    f.add_argument("--variant", default="sp1024", help="tokenizer variant (default sp1024)")
    f.add_argument("--train-shards", type=int, default=1, help="number of 100M-token train shards (default 1)")
    f.add_argument("--out", required=True, help="output root; data lands in OUT/datasets/fineweb10B_<variant> and OUT/tokenizers")
    f.add_argument("--endpoint", help="hub base URL (default https://huggingface.co or $LOOPGOLF_HF_ENDPOINT)")
    f.set_defaults(func=cmd_data_fineweb)

    s = dsub.add_parser("stats", help="documents, tokens, target bytes and bytes/token per shard")
    s.add_argument("paths", nargs="+", help="shard files or a dataset directory")
    s.add_argument("--tokenizer", help="SentencePiece model for byte counts (default: found next to the data)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_stats)

    d = dsub.add_parser("default", help="prepare (once) and locate the embedded default dataset")
    d.add_argument("--vocab-size", type=_positive_int, default=1024)
    d.set_defaults(func=cmd_data_default)


# --------------------------------------------------------------- params, presets


def cmd_params(args: argparse.Namespace) -> int:
    import torch

    from loopgolf.config import get_preset
    from loopgolf.model.gpt import GPT, ModelConfig, effective_params, forward_flops_per_token, unique_params

    preset = get_preset(args.preset)
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), **model_overrides(args)})
    with torch.device("meta"):
        model = GPT(cfg)
    seq_len = args.seq_len or preset.train.seq_len
    tensors = [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p in model.named_parameters()]
    out = {
        "preset": preset.name,
        "unique_params": unique_params(model),
        "effective_params": effective_params(model),
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len),
        "seq_len": seq_len,
        "plan": model.plan.to_dict(),
        "tensors": tensors,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"preset {preset.name}: {model.plan.describe()}")
    print(f"unique params {out['unique_params']:,} | effective params {out['effective_params']:,} | forward FLOPs/token {out['forward_flops_per_token']:,} (seq {seq_len})")
    print(f"virtual layer -> (attn, mlp): " + " ".join(f"{v}:({a},{m})" for v, (a, m) in enumerate(zip(model.plan.attn_of, model.plan.mlp_of))))
    width = max(len(t["name"]) for t in tensors)
    for t in tensors:
        print(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<16} {t['numel']:>12,}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from loopgolf.config import PRESETS

    if args.json:
        from dataclasses import asdict

        out = {n: {"description": p.description, "model": p.model.to_dict(), "train": asdict(p.train), "eval_batch_size": p.eval_batch_size} for n, p in PRESETS.items()}
        print(json.dumps(out, indent=2))
    else:
        width = max(len(n) for n in PRESETS)
        for n, p in PRESETS.items():
            print(f"{n:<{width}}  {p.description}")
    return 0


def add_info_parsers(sub: argparse._SubParsersAction) -> None:
    from loopgolf.config import DEFAULT_PRESET, PRESETS

    p = sub.add_parser("params", help="unique/effective params, FLOPs/token and the virtual-layer map (no training)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--seq-len", type=_positive_int, help="sequence length for the attention FLOPs")
    add_model_overrides(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

    q = sub.add_parser("presets", help="list the named presets")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_presets)


# ----------------------------------------------------------------------- bench


def cmd_bench_train(args: argparse.Namespace) -> int:
    from loopgolf.bench.train import bench_json, bench_train, format_bench

    train_set: dict[str, Any] = dict(args.train_set)
    for flag, key in (("seq_len", "seq_len"), ("batch_tokens", "batch_tokens"), ("micro_batch_tokens", "micro_batch_tokens")):
        if getattr(args, flag) is not None:
            train_set[key] = getattr(args, flag)
    if args.compile:
        train_set["compile"] = True
    result = bench_train(
        args.preset, model_overrides=model_overrides(args), train_overrides=train_set, steps=args.steps,
        warmup=args.warmup, device=args.device, peak_size=args.peak_size, threads=args.threads,
    )
    print(bench_json(result) if args.json else format_bench(result))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from loopgolf.config import DEFAULT_PRESET, PRESETS

    p = sub.add_parser("bench", help="benchmarks: training throughput and MFU")
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="{train,serve}")
    t = bsub.add_parser(
        "train", help="tokens/s, step time, memory and MFU of the training step on synthetic tokens",
        description="Run the trainer on synthetic tokens (warm-up steps, then measured steps) and report tokens/s, step time, "
        "memory and MFU = 3 x forward FLOPs/token (from the plan) x tokens/s / the matmul peak measured in the same process "
        "(float32 on CPU, bf16 on CUDA). With --json the result is one JSON line.",
    )
    t.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"configuration to measure (default {DEFAULT_PRESET})")
    t.add_argument("--steps", type=_positive_int, default=10, help="measured steps (default 10)")
    t.add_argument("--warmup", type=_non_negative_int, default=3, help="unmeasured steps first (default 3)")
    t.add_argument("--device", help="auto, cpu or cuda")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; on CPU it needs a C++ compiler)")
    t.add_argument("--seq-len", type=_positive_int, help="training sequence length")
    t.add_argument("--batch-tokens", type=_positive_int, help="global tokens per optimizer step")
    t.add_argument("--micro-batch-tokens", type=_positive_int, help="tokens per forward (gradient accumulation)")
    t.add_argument("--peak-size", type=_positive_int, help="n of the n x n peak matmul (default 2048 on CPU, 8192 on CUDA)")
    t.add_argument("--threads", type=_positive_int, help="CPU threads for training and the peak (default: torch's)")
    t.add_argument("--train", dest="train_set", type=_kv, action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    add_model_overrides(t)
    t.add_argument("--json", action="store_true", help="print the result as one JSON line")
    t.set_defaults(func=cmd_bench_train)

    s = bsub.add_parser(
        "serve", help="tokens/s and latency of static, sequence and depth-wise batching; early exit's bpb cost; a server load test",
        description="Serve one request stream (prompts cut from the validation tokens, greedy) on the static full-depth, "
        "sequence-level continuous and continuous depth-wise engines (and sequence batching with early exit, to separate the "
        "two effects); score val_bpb with and without early exit; load-test `loopgolf serve` from a second process. "
        "With --json the last line is the JSON result.",
    )
    s.add_argument("model", metavar="ARTIFACT_OR_RUN", help="a recursive model: an artifact or a run directory")
    s.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
    s.add_argument("--data", help="dataset for prompts and scoring (default: the run's)")
    s.add_argument("--early-exit", default="agree", metavar="CRITERION", help=f"{CRITERION_SYNTAX} (default agree)")
    s.add_argument("--requests", type=_positive_int, default=32, help="requests in the stream (default 32)")
    s.add_argument("--prompt-len", type=_int_list, default=[16, 96], metavar="MIN,MAX", help="prompt tokens (default 16,96)")
    s.add_argument("--output-len", type=_int_list, default=[16, 64], metavar="MIN,MAX", help="generated tokens (default 16,64)")
    s.add_argument("--arrival-rate", type=float, default=0.0, help="Poisson arrivals per second (default 0: all at once)")
    s.add_argument("--slots", type=_positive_int, default=8, help="requests decoded at once (default 8)")
    s.add_argument("--eval-tokens", type=_positive_int, default=16384, help="validation tokens for the bpb cost (default 16384)")
    s.add_argument("--server-requests", type=_non_negative_int, default=16, help="requests in the server load test (0: skip it; default 16)")
    s.add_argument("--concurrency", type=_positive_int, default=4, help="client threads in the load test (default 4)")
    s.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    s.add_argument("--repeats", type=_positive_int, default=3, help="rounds of the four engines; medians reported (default 3)")
    s.add_argument("--seed", type=_non_negative_int, default=0, help="request stream seed")
    s.add_argument("--json", action="store_true", help="print the result as one JSON line")
    s.set_defaults(func=_serve_command("cmd_bench_serve"))


# ----------------------------------------------------------------------- serve

# loopgolf.serve.exits.CRITERION_SYNTAX, spelled here so that a plain run does not import
# loopgolf.serve (nor count it in its code bytes); a test keeps the two equal.
CRITERION_SYNTAX = "never | maxprob:P (0 < P <= 1) | agree | after:N (N >= 1)"


def _serve_command(name: str) -> Callable[[argparse.Namespace], int]:
    return _lazy_command("loopgolf.serve.commands", name)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="ARTIFACT_OR_RUN", help="an artifact, or a run directory holding artifact.lgz")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one of the data the run trained on)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--early-exit", metavar="CRITERION", help=f"stop a token after a pass of a recursive plan when: {CRITERION_SYNTAX} (default: full depth)")


def add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from an artifact or run (KV cache per virtual layer, optional early exit)")
    _add_model_source(g)
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1)")
    g.add_argument("--top-k", type=_non_negative_int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: all)")
    g.add_argument("--seed", type=_non_negative_int, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the text")
    g.set_defaults(func=_serve_command("cmd_generate"))

    s = sub.add_parser("serve", help="an OpenAI-style completions server (localhost) on a continuous-batching engine",
                       description="Serve POST /v1/completions (stream via server-sent events), GET /v1/models and GET /health with "
                       "starlette + uvicorn. Requests share one engine (continuous depth-wise batching by default); a full queue "
                       "answers 429, a request past --timeout 504; SIGTERM finishes in-flight requests for --shutdown-grace seconds.")
    _add_model_source(s)
    s.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    s.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1, this machine only)")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host other than localhost")
    s.add_argument("--name", help="the model id clients ask for (default: the run directory's name)")
    s.add_argument("--schedule", choices=("depthwise", "sequence", "static"), default="depthwise", help="engine schedule (default depthwise)")
    s.add_argument("--slots", type=_positive_int, default=8, help="requests decoded at once (default 8)")
    s.add_argument("--context", type=_positive_int, help="prompt + completion tokens per request (default: the training seq_len)")
    s.add_argument("--max-queue", type=_non_negative_int, default=64, help="waiting requests before 429 (default 64)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, queueing included (default 120)")
    s.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM (default 10)")
    s.set_defaults(func=_serve_command("cmd_serve"))


# ------------------------------------------------------------------------ plan


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def measure_matmul_rate() -> tuple[float, str]:
    """(FLOP/s, what was measured) of a short matmul benchmark on this machine's training device:
    1024 x 1024 float32 matmuls on CPU (well under a second), the bench's bf16 size on CUDA."""
    import torch

    from loopgolf.device import matmul_peak

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device, size=None if device.type == "cuda" else 1024, reps=2, trials=3)
    return peak.flops, f"{peak.size} x {peak.size} {peak.dtype} matmuls on {device.type}"


def script_code_bytes(preset: str) -> int:
    """The bytes of the train_gpt.py a default run of ``preset`` generates (what the run counts)."""
    from loopgolf.run import RunOptions, fresh_config
    from loopgolf.submit.bundle import code_counts

    return code_counts(fresh_config(RunOptions(preset=preset))[1]).code_bytes


def cmd_plan(args: argparse.Namespace) -> int:
    from loopgolf.config import get_preset
    from loopgolf.budget import UNCALIBRATED, default_family, family_presets, predict_bytes, run_overrides, search, train_step_seconds
    from loopgolf.export.quantize import parse_policy
    from loopgolf.model.gpt import ModelConfig

    policy = parse_policy(args.quant)
    overrides = model_overrides(args)
    family = args.family or ([args.preset] if args.preset else default_family())  # a list: that preset, not its family
    n_code = script_code_bytes(args.preset or family_presets(family)[0]) if args.code_bytes is None else args.code_bytes
    out: dict[str, Any] = {"cap_bytes": args.cap, "code_bytes": n_code, "quant": policy.describe()}
    if args.preset:
        preset = get_preset(args.preset)
        cfg = ModelConfig.from_dict({**preset.model.to_dict(), **overrides})
        pred = predict_bytes(cfg, policy, args.codec, weights=args.weights)
        total = pred["model_bytes"] + n_code
        out["config"] = {
            "preset": args.preset, "overrides": run_overrides(preset.model, cfg), "predicted_bytes": total,
            "predicted_model_bytes": pred["model_bytes"], "codec": pred["codec"], "by_codec": pred["by_codec"],
            "fits": total <= args.cap, "headroom_bytes": args.cap - total, "unique_params": pred["unique_params"],
            "uncalibrated": pred["uncalibrated"], "tensors": pred["tensors"],
        }
    search_overrides = {k: v for k, v in overrides.items() if k not in ("model_dim", "num_heads", "num_kv_heads")}
    candidates = search(
        args.cap, family, policy, codec=args.codec, code_bytes=n_code, overrides=search_overrides,
        layers=args.layers, loops=args.loops, width_step=args.width_step, weights=args.weights,
    )[: args.top]
    rate, measured = (args.matmul_flops, "given by --matmul-flops") if args.matmul_flops else measure_matmul_rate()
    for c in candidates:
        c["est_step_seconds"] = train_step_seconds(c["forward_flops_per_token"], c["tokens_per_step"], rate)
    out["family"] = family if isinstance(family, str) else ",".join(family)
    out["matmul_flops"] = {"flops_per_second": rate, "measured": measured}
    out["candidates"] = candidates
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    notes = {key for c in [*candidates, out.get("config", {})] for key in c.get("uncalibrated", [])}
    if "config" in out:
        c = out["config"]
        verdict = f"fits, {c['headroom_bytes']:,} to spare" if c["fits"] else f"OVER by {-c['headroom_bytes']:,}"
        mark = " (uncalibrated)" if c["uncalibrated"] else ""
        print(f"{c['preset']} {' '.join(c['overrides'])}".rstrip())
        print(f"  predicted{mark} {c['predicted_model_bytes']:,} model ({c['codec']}) + {n_code:,} code = {c['predicted_bytes']:,} of {args.cap:,}: {verdict}")
    print(f"candidates of family {out['family']} fitting {args.cap:,} bytes with quant {policy.describe()} (widest, deepest, most loops first):")
    if not candidates:
        print("  none: lower the bits, or raise the cap")
    else:
        print(f"  {'bytes':>12}  {'d':<5} {'V':<3} {'loops':<5} {'unique':>11}  {'fwd FLOPs/tok':>13}  {'~step s':>8}  command")
    for c in candidates:
        mark = "*" if c["uncalibrated"] else " "
        print(
            f"  {c['predicted_bytes']:>11,}{mark}  {c['model_dim']:<5} {c['virtual_layers']:<3} {c['loops']:<5} {c['unique_params']:>11,}  "
            f"{c['forward_flops_per_token']:>13.3g}  {c['est_step_seconds']:>8.3g}  loopgolf run --preset {c['preset']} {' '.join(c['overrides'])}".rstrip()
        )
    if candidates:
        print(
            f"  ~step s: an estimate of one training step here, 3 x forward FLOPs/token x tokens/step / {rate / 1e9:,.1f} GFLOP/s "
            f"({measured}); real steps are slower (elementwise work, optimizer, data)"
        )
    for key in sorted(notes):
        print(f"  * uncalibrated: {UNCALIBRATED[key]}")
    return 0


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """``loopgolf plan``: predicted bytes of a configuration and the family members that fit."""
    from loopgolf.config import PRESETS
    from loopgolf.export.artifact import CODECS

    p = sub.add_parser(
        "plan",
        help="predict artifact bytes before training; list the widest configurations that fit a cap",
        description="Byte planner: a configuration's artifact size before training, and the configurations of a preset "
        "family that fit a cap, with each one's forward FLOPs per token and an estimated training step time on this "
        "machine. Predictions come from compression rates measured on real exports, for a trained model by default "
        "(docs/LOG.md has the measured errors).",
    )
    p.add_argument("--cap", type=int, default=DEFAULT_CAP_BYTES, help="artifact byte cap, code included (default 16,000,000)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="predict this preset (with the overrides) and search its widths")
    p.add_argument(
        "--family",
        help="search these presets instead: cpu, pg, all, or names separated by commas "
        "(default: --preset, else the family that suits this machine: pg with CUDA, cpu without)",
    )
    p.add_argument("--quant", default="", help="quantization policy, e.g. int6 or attn=6,mlp=5,embed=8,gptq (default int8)")
    p.add_argument("--codec", default="auto", help="auto (smallest), " + ", ".join(CODECS))
    p.add_argument(
        "--weights", choices=("trained", "init"), default="trained",  # loopgolf.budget.WEIGHTS, not imported to keep startup light
        help="predict a trained model (default) or freshly initialised, Gaussian-like weights, which code a few percent larger",
    )
    p.add_argument("--code-bytes", type=int, help="code bytes counted against the cap (default: the size of the train_gpt.py a run of the preset generates)")
    p.add_argument("--layers", type=_int_list, help="also try these unique-layer counts (the plan's `layers`), e.g. 2,3,4")
    p.add_argument("--loops", type=_int_list, help="also try these loop counts, e.g. 2,3,4")
    p.add_argument("--width-step", type=int, help="width granularity (default: head size x query/KV ratio)")
    p.add_argument("--top", type=int, default=10, help="candidates to list (default 10)")
    p.add_argument("--matmul-flops", type=float, help="FLOP/s to estimate step times with (default: measured here in well under a second)")
    add_model_overrides(p)
    p.add_argument("--json", action="store_true", help='print {"config": ..., "candidates": [...]}')
    p.set_defaults(func=cmd_plan)


CONVERT_INITS = ("stepwise", "average", "lower", "upper", "random")  # loopgolf.convert.recursive.INITS (a test checks)


def cmd_convert(args: argparse.Namespace) -> int:
    from loopgolf.convert.command import cmd_convert as run_convert

    return run_convert(args)


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="tie a trained model's layers into a recursive one (Stepwise/Average/... init, SVD LoRA)",
        description="Convert a trained vanilla model (a loopgolf run directory or artifact, or a Hugging Face Llama/SmolLM/"
        "TinyLlama, Gemma or GPT-2 directory with safetensors) into a CYCLE or SEQUENCE recursive model, optionally "
        "relaxed by per-virtual-layer LoRA initialised from the truncated SVD of what the tying lost.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="run directory, artifact, or Hugging Face model directory")
    p.add_argument("--plan", required=True, help="cycle:KxB or sequence:KxB with K * B = the source's layers")
    p.add_argument("--init", choices=CONVERT_INITS, default="stepwise", help="shared-block initialisation (default stepwise)")
    p.add_argument("--lora-rank", type=_non_negative_int, metavar="R", help="LoRA rank on every projection of the model (0: strict recursion)")
    p.add_argument("--lora-ranks", type=_lora_ranks, metavar="RANKS", help="per-projection ranks, e.g. q=8,v=8,mlp_in=32")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / r (default: scale 1); the SVD factors are divided by it")
    p.add_argument("--controls", choices=("auto", "per-layer", "shared"), default="auto",
                   help="norm gains, biases and scales per virtual layer or per stored block (auto: per layer when relaxed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh init (Random blocks, adapter A factors)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)


def cmd_submission(args: argparse.Namespace) -> int:
    from loopgolf.submit.records import SCRIPT_NAME, SubmissionInfo, write_records

    info = SubmissionInfo(name=args.name, author=args.author or "", github_id=args.github_id or "", blurb=args.blurb or "", date=args.date)
    sub = write_records(args.runs, args.out, info=info, form="minify" if args.minify else "plain", compress=args.compress,
                        force=args.force, allow_code_change=args.allow_code_change)
    if args.json:
        print(json.dumps(sub, indent=2))
        return 0
    print(f"loopgolf submission: {args.out}: {SCRIPT_NAME} {sub['bytes_code']:,} bytes, {len(sub['seeds'])} seed(s), "
          f"val_bpb {sub['val_bpb']:.8f} (std {sub['val_bpb_std']:.8f}), at most {sub['bytes_total']:,} of {sub['cap_bytes']:,} bytes")
    for seed, r in sub["seed_results"].items():
        print(f"  seed {seed}: val_bpb {r['val_bpb']:.8f}  {r['steps']} steps  {r['artifact_bytes']:,} bytes")
    if not info.author or not info.github_id:
        print("  fill in author and github_id in submission.json (or pass --author/--github-id) before opening the pull request")
    return 0


def add_submission_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submission", help="finished runs (seeds of one config) -> a Parameter Golf records folder with a generated train_gpt.py",
        description="Write a records folder: train_gpt.py generated from the loopgolf modules that train, export and score "
        "the runs' configuration (its size is the code_bytes the runs reported), README.md, submission.json and "
        "train_seed<N>.log per run. Refuses runs of different configurations (naming the field), unfinished or "
        "uptraining runs, repeated seeds, and any seed over the cap.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories, one per seed")
    p.add_argument("--out", required=True, help="records folder to write (e.g. records/track_10min_16mb/2026-12-05_MyModel)")
    p.add_argument("--name", help="submission name (default: loopgolf PRESET)")
    p.add_argument("--author", help="author for submission.json")
    p.add_argument("--github-id", help="GitHub id for submission.json")
    p.add_argument("--blurb", help="one-paragraph description (default: the model's technique summary)")
    p.add_argument("--date", help="submission date, ISO (default: today, UTC)")
    p.add_argument("--minify", action="store_true", help="minify the embedded modules (python-minifier; docstrings dropped, names kept)")
    p.add_argument("--compress", nargs="?", const="lzma", choices=("lzma", "brotli"),
                   help="wrap the script in a self-extracting stub (default lzma)")
    p.add_argument("--allow-code-change", action="store_true",
                   help="accept runs made by other loopgolf code than this installation's (their code id differs)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print submission.json")
    p.set_defaults(func=cmd_submission)


def _lazy_command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command whose code lives in ``module`` (loopgolf.lab, loopgolf.serve): building the parser
    must not import it, so eval and the counted code closure stay light."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    run.__name__ = name
    return run


def _lab_command(name: str) -> Callable[[argparse.Namespace], int]:
    return _lazy_command("loopgolf.lab.commands", name)


# The defaults of loopgolf.lab.commands, spelled here for the help text (a test keeps them equal).
LAB_DEFAULT_STORE = "runs/loopgolf.sqlite"
LAB_DEFAULT_COLUMNS = "ledger,variant,seed,status,val_bpb_post,artifact_bytes,unique_params,steps,tokens_per_second,run_dir"


def add_lab_parsers(sub: argparse._SubParsersAction) -> None:
    store_help = f"results store (default $LOOPGOLF_STORE or {LAB_DEFAULT_STORE})"
    p = sub.add_parser("sweep", help="run a ledger's variants x seeds (resumable, parallel, into the results store)",
                       description="Run every (variant, seed) of LEDGER (a TOML file or a built-in name: cpu-seed, pg-seed) as a normal "
                       "run directory OUT/<variant>/seed<N>. Finished runs are skipped; failed or killed ones are redone. Runs go in "
                       "parallel worker processes, each pinned to its own cores, never more jobs x threads than cores.")
    p.add_argument("ledger", metavar="LEDGER")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/<ledger name>)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--data", help="dataset directory for every run (default: the ledger's data, usually the embedded corpus)")
    p.add_argument("--jobs", type=int, help="parallel runs (default: cores // threads; 1 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="threads (cores) per run (default 1)")
    p.add_argument("--variants", help="comma-separated variants to run (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds, replacing the ledger's (e.g. 1,2,3 for the best variants)")
    p.add_argument("--device", help="cpu, cuda, ... (default: each run's default)")
    p.add_argument("--list", action="store_true", help="list the runs and whether each is done; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_lab_command("cmd_sweep"))

    r = sub.add_parser("runs", help="query the results store (or `runs add RUN_DIR` to add runs made outside a sweep)")
    r.add_argument("--store", help=store_help)
    r.add_argument("--ledger", help="only this ledger's runs (with `add`: the ledger to file them under)")
    r.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="keep rows whose field equals VALUE (a column, summary key or dotted config path); repeatable")
    r.add_argument("--sort", help="sort by this field (--sort=-KEY for descending)")
    r.add_argument("--columns", help=f"comma-separated fields to show (default {LAB_DEFAULT_COLUMNS})")
    r.add_argument("--csv", action="store_true", help="CSV on stdout")
    rsub = r.add_subparsers(dest="runs_command", metavar="add")
    a = rsub.add_parser("add", help="add finished run directories to the store")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    a.add_argument("--ledger", default=argparse.SUPPRESS, help="the ledger to file them under")
    a.add_argument("--variant", help="variant name to file them under (default: the run's preset)")
    r.set_defaults(func=_lab_command("cmd_runs"))

    q = sub.add_parser("report", help="a ledger's runs -> markdown report with Welch t-tests and PNG plots")
    q.add_argument("ledger", metavar="LEDGER")
    q.add_argument("--out", required=True, help="report directory (report.md and the PNGs)")
    q.add_argument("--store", help=store_help)
    q.add_argument("--store-ledger", help="read the store's runs filed under this name (default: the ledger's name)")
    q.add_argument("--command-note", help="the command to print in the report (default: this one)")
    q.set_defaults(func=_lab_command("cmd_report"))


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_run_parser, add_eval_parser, add_convert_parser, add_submission_parser, add_data_parser, add_info_parsers, add_bench_parser, add_plan_parser,
    add_lab_parsers, add_serve_parsers,
)


def build_parser() -> argparse.ArgumentParser:
    from loopgolf import __version__

    parser = argparse.ArgumentParser(prog="loopgolf", description="Build, train, compress and score the best language model per stored byte.")
    parser.add_argument("--version", action="version", version=f"loopgolf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:
        # User mistakes and bad inputs (bad values and files, a diverged run, a full or read-only
        # disk): one clear line, no traceback; --debug shows it.
        if args.debug:
            raise
        print(f"loopgolf {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
