"""`loopgolf data`: build, fetch and inspect datasets in the official shard format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopgolf.commands.args import positive_int

DESCRIPTION: dict[str, str] = {}


def cmd_data_build(args: argparse.Namespace) -> int:
    from loopgolf.data.corpus import build_dataset

    manifest = build_dataset(
        args.input,
        Path(args.out),
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        val_docs=args.val_docs,
        val_fraction=args.val_fraction,
        seed=args.seed,
        byte_fallback=not args.no_byte_fallback,
        shuffle=not args.keep_order,
        force=args.force,
        progress=not args.json,
        transform=args.transform,
        **({"max_input_bytes": args.max_input_bytes} if args.max_input_bytes else {}),
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        for split, s in manifest["splits"].items():
            print(f"{split:5s}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['text_bytes']:,} text bytes, {len(s['shards'])} shard(s)")
        order = f"shuffled (seed {manifest['shuffle_seed']})" if manifest["train_order"] == "shuffled" else "in source order"
        transform = f", text transform {manifest['text_transform']} with validation byte sidecars" if "text_transform" in manifest else ""
        print(f"wrote {args.out} (vocab {manifest['vocab_size']}, tokenizer {manifest['tokenizer']}, train documents {order}{transform})")
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


def register(name: str, p: argparse.ArgumentParser) -> None:
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{build,fineweb,stats,default}")

    b = dsub.add_parser("build", help="text/jsonl files or folders -> tokenizer + train/val shards + manifest")
    b.add_argument("--input", nargs="+", required=True, help='.txt files (one document each), .jsonl files ({"text": ...} per line) or folders')
    b.add_argument("--out", required=True, help="output dataset directory")
    tok = b.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=positive_int, default=1024, help="train a SentencePiece BPE tokenizer of this size (default 1024)")
    tok.add_argument("--tokenizer", help="use this SentencePiece model instead of training one")
    val = b.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=positive_int, help="hold out this many documents for validation")
    val.add_argument("--val-fraction", type=float, help="hold out this fraction of documents (default 0.05)")
    b.add_argument("--seed", type=int, default=1337, help="seeds the validation choice, the train shuffle and tokenizer training")
    b.add_argument(
        "--keep-order",
        action="store_true",
        help="keep the training documents in source order (default: shuffled with --seed; validation keeps source order either way)",
    )
    b.add_argument("--no-byte-fallback", action="store_true", help="train the tokenizer without byte-fallback pieces")
    b.add_argument(
        "--transform",
        choices=["caseops", "identity"],
        help="transform the text losslessly before tokenizing (caseops: capitals become lowercase letters plus operator characters) and "
        "write byte sidecars that score val_bpb on the original text's bytes (default: none, or what --tokenizer declares)",
    )
    b.add_argument(
        "--max-input-bytes",
        type=positive_int,
        metavar="N",
        help="refuse an input file larger than N bytes (default 8 GiB); inputs must be regular files or symlinks to them (FIFOs and devices are refused)",
    )
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
    d.add_argument("--vocab-size", type=positive_int, default=1024)
    d.set_defaults(func=cmd_data_default)
