"""Fuzz ``loopgolf.export.pack.load_model`` with mutated, resealed artifacts.

One real artifact (a tiny GPT exported with codec="zlib") is built once. Each case applies 1-3
random mutations, then recomputes the checksum (``seal``) so the mutation reaches the loader's
validation instead of stopping at the checksum. Mutation families:

  payload  random byte overwrites in the tensor data
  header   a random node anywhere in the JSON header replaced by a pool value
  config   a ModelConfig / PlanSpec field replaced by a pool value
  table    a tensor-table entry deleted or duplicated

Each case runs ``load_model(blob)`` and, if it loads, one forward pass on a fixed token batch.
Outcomes: clean_error (ArtifactError), loaded_finite, traceback (any other exception, including
MemoryError under the RLIMIT_AS cap), nan (loaded but non-finite output), hang (over --timeout).

    python -m loopgolf.bench.fuzz_artifact --cases 10000 [--seed 0] [--json] [--max-memory-gb 8]
    python -m loopgolf.bench.fuzz_artifact --seed 0 --case 1234 -v     # replay one case

Case i uses ``numpy.random.default_rng([seed, i])``, so any case replays on its own. Exit status
1 if any traceback, nan or hang occurred.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopgolf.export.artifact import ArtifactError, seal, unseal
from loopgolf.export.pack import export_model, load_model
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec

HLEN = struct.Struct("<I")
OUTCOMES = ("clean_error", "loaded_finite", "traceback", "nan", "hang")
BAD = ("traceback", "nan", "hang")

POOL = [
    2**22,
    2**31,
    2**40,
    2**63,
    -(2**63),
    -1,
    0,
    1,
    2,
    3,
    7,
    32,
    64,
    10**9,
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.0,
    1e308,
    0.5,
    1e-45,
    "",
    "x",
    "float32",
    "float16",
    "bfloat16",
    "int8",
    "int64",
    "planes",
    "raw",
    "cycle",
    "tok_emb.weight",
    "attn_scale",
    "../../etc/passwd",
    "\u0000",
    "a" * 1000,
    [],
    [1],
    [0],
    [-1],
    [2**40],
    [2**22, 2**22],
    [64, 32],
    [32],
    [1, 2, 3, 4, 5, 6, 7, 8, 9],
    ["float32"],
    [None],
    [[1]],
    {},
    {"kind": "cycle"},
    {"dtype": "float32"},
    {"a": 1},
    None,
    True,
    False,
]

CONFIG_FIELDS = [
    "vocab_size",
    "model_dim",
    "num_heads",
    "num_kv_heads",
    "mlp_mult",
    "plan",
    "tie_embeddings",
    "per_layer_controls",
    "depth_embeddings",
    "lora_ranks",
    "lora_alpha",
    "rope_base",
    "max_seq_len",
    "logit_softcap",
    "qk_gain_init",
    "tied_embed_init_std",
]
PLAN_FIELDS = ["kind", "layers", "loops", "first", "last", "loop_start", "loop_end", "share", "attn_of", "mlp_of"]
CONFIG_EXTRA = [  # plausible-but-wrong values that get past type checks
    {"kind": "vanilla", "layers": 2},
    {"kind": "cycle", "layers": 1, "loops": 10**9},
    {"kind": "explicit", "attn_of": [0, 0], "mlp_of": [0, 0]},
    {"kind": "explicit", "attn_of": [0, 5], "mlp_of": [0, 0]},
    {"kind": "mini-loop", "layers": 1, "loops": 2, "loop_start": 0, "loop_end": 0},
    "cycle:1x2",
    "cycle:1x3",
    {"c_q": 4},
    {"c_q": 2**22},
    {"mlp": -1},
    1e30,
    1e-30,
    16,
    128,
    4,
]
PLAN_EXTRA = ["vanilla", "sequence", "cycle-rev", "middle-cycle", "explicit", "mlp", "attn", "none", [0, 0], [0, 1], [5], 10**6]


class CaseTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so no `except Exception` in the loader swallows it."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1, plan=PlanSpec("cycle", layers=1, loops=2), per_layer_controls=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def build_artifact(model: GPT | None = None) -> bytes:
    """The bytes of ``model`` (default: :func:`tiny_model`) exported with codec zlib."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.lgz"
        export_model(tiny_model() if model is None else model, path, codec="zlib")
        return path.read_bytes()


def split(blob: bytes) -> tuple[str, dict, bytes]:
    codec, payload = unseal(blob)
    (n,) = HLEN.unpack_from(payload)
    return codec, json.loads(payload[4 : 4 + n]), payload[4 + n :]


def reseal(codec: str, header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()  # allow_nan: a crafted header may hold NaN
    return seal(HLEN.pack(len(raw)) + raw + bytes(data), codec)[1]


# ---------------------------------------------------------------- mutations


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _value(rng: np.random.Generator, extra=()) -> object:
    pool = POOL + list(extra)
    return copy.deepcopy(_pick(rng, pool))


def _nodes(obj, path=()):
    """Every (path) below the root: dict keys and list indices, containers and leaves."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,)
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield path + (i,)
            yield from _nodes(v, path + (i,))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _path_str(path) -> str:
    return "".join(f"[{k!r}]" for k in path)


def mut_payload(rng, header, data: bytearray) -> str:
    if not data:
        return "payload: empty, nothing to overwrite"
    n = int(rng.integers(1, 5))
    edits = []
    for _ in range(n):
        pos = int(rng.integers(len(data)))
        special = [0x00, 0xFF, 0x7F, 0x80, 0x7C, 0xFE]
        val = int(rng.integers(256)) if rng.random() < 0.6 else int(_pick(rng, special))
        data[pos] = val
        edits.append((pos, val))
    return f"payload: overwrite bytes {edits}"


def mut_header(rng, header, data) -> str:
    nodes = list(_nodes(header))
    # weight tensor-table nodes so they are hit as often as config/meta ones
    table = [p for p in nodes if p[0] == "tensors"]
    other = [p for p in nodes if p[0] != "tensors"]
    path = _pick(rng, table if (table and rng.random() < 0.6) or not other else other)
    value = _value(rng)
    _set(header, path, value)
    return f"header: h{_path_str(path)} = {value!r:.80}"


def mut_config(rng, header, data) -> str:
    mc = header.get("model_config")
    if not isinstance(mc, dict):
        return "config: model_config is not a dict, skipped"
    plan = mc.get("plan")
    if isinstance(plan, dict) and rng.random() < 0.4:
        return _mutate_field(rng, plan, PLAN_FIELDS, PLAN_EXTRA, "h['model_config']['plan']")
    return _mutate_field(rng, mc, CONFIG_FIELDS, CONFIG_EXTRA, "h['model_config']")


def _mutate_field(rng, target: dict, fields: list[str], extra, label: str) -> str:
    """Delete (1 in 10) or overwrite one field of ``target`` (or an unknown "bogus" one)."""
    key = _pick(rng, fields + ["bogus"])
    if rng.random() < 0.1:
        target.pop(key, None)
        return f"config: del {label}[{key!r}]"
    value = _value(rng, extra)
    target[key] = value
    return f"config: {label}[{key!r}] = {value!r:.80}"


def mut_table(rng, header, data) -> str:
    t = header.get("tensors")
    if not isinstance(t, list) or not t:
        return "table: tensors is not a non-empty list, skipped"
    i = int(rng.integers(len(t)))
    if rng.random() < 0.5:
        t.pop(i)
        return f"table: del h['tensors'][{i}]"
    j = int(rng.integers(len(t) + 1))
    t.insert(j, copy.deepcopy(t[i]))
    return f"table: h['tensors'].insert({j}, copy of h['tensors'][{i}])"


FAMILIES = [mut_payload, mut_header, mut_config, mut_table]


def make_case(base: tuple[str, dict, bytes], seed: int, index: int) -> tuple[bytes, list[str]]:
    rng = np.random.default_rng([seed, index])
    codec, header0, data0 = base
    header, data = copy.deepcopy(header0), bytearray(data0)
    desc = []
    for _ in range(int(rng.integers(1, 4))):
        desc.append(_pick(rng, FAMILIES)(rng, header, data))
    return reseal(codec, header, data), desc


# ---------------------------------------------------------------- running


def probe_tokens(vocab: int, max_seq_len: int) -> torch.Tensor:
    base = torch.from_numpy(np.random.default_rng(1234).integers(0, 2**31 - 1, size=(3, 24)))
    n = max(1, min(24, max_seq_len))
    return (base[:, :n] % vocab).long()


def run_case(blob: bytes, timeout: float) -> tuple[str, str | None]:
    """(outcome, detail) for one blob."""
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            model, _ = load_model(blob)
        except ArtifactError as e:
            return "clean_error", f"{type(e).__name__}: {e}"
        except CaseTimeout:
            raise
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return "traceback", "".join(traceback.format_exception(type(e), e, e.__traceback__))
        try:
            with torch.no_grad():
                logits = model(probe_tokens(model.config.vocab_size, model.config.max_seq_len))
        except CaseTimeout:
            raise
        except Exception as e:
            return "traceback", "forward pass: " + "".join(traceback.format_exception(type(e), e, e.__traceback__))
        if not bool(torch.isfinite(logits).all()):
            return "nan", "loaded, but the forward pass gave non-finite logits"
        return "loaded_finite", None
    except CaseTimeout:
        return "hang", f"over {timeout} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def signature(f: dict) -> str:
    """outcome + exception line + innermost loopgolf frame, to group findings by cause."""
    lines = (f["detail"] or "").strip().splitlines()
    where = [ln.strip() for ln in lines if ln.strip().startswith("File") and "/loopgolf/" in ln]
    return f"{f['outcome']}: {lines[-1] if lines else ''} @ {where[-1] if where else '?'}"


def distinct(findings: list[dict]) -> dict:
    out: dict = {}
    for f in findings:
        d = out.setdefault(signature(f), {"count": 0, "first_case": f["case"]})
        d["count"] += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, default=None, help="replay only this case index")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="RLIMIT_AS cap (0: none)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary instead of text")
    ap.add_argument("--show", type=int, default=5, help="findings to print in full")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    base = split(build_artifact())
    if args.max_memory_gb > 0:
        cap = int(args.max_memory_gb * 2**30)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.signal(signal.SIGALRM, _on_alarm)

    indices = [args.case] if args.case is not None else range(args.cases)
    counts = dict.fromkeys(OUTCOMES, 0)
    findings = []
    slowest = (0.0, None)
    t_start = time.perf_counter()
    for i in indices:
        blob, desc = make_case(base, args.seed, i)
        t0 = time.perf_counter()
        outcome, detail = run_case(blob, args.timeout)
        dt = time.perf_counter() - t0
        counts[outcome] += 1
        if dt > slowest[0]:
            slowest = (dt, i)
        if outcome in BAD:
            findings.append(
                {
                    "case": i,
                    "outcome": outcome,
                    "mutations": desc,
                    "detail": detail,
                    "replay": f"python -m loopgolf.bench.fuzz_artifact --seed {args.seed} --case {i} -v",
                }
            )
        if args.verbose and not args.json:
            print(f"case {i}: {outcome} ({dt:.3f} s) {desc}")
            if detail:
                print("   ", detail.strip().splitlines()[-1])
    wall = time.perf_counter() - t_start

    summary = {
        "cases": len(indices),
        "seed": args.seed,
        "counts": counts,
        "wall_s": round(wall, 3),
        "slowest_case_s": round(slowest[0], 4),
        "slowest_case": slowest[1],
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "findings": len(findings),
        "first_findings": findings[: args.show],
        "distinct_findings": distinct(findings),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['cases']} cases, seed {args.seed}, {wall:.1f} s")
        for k in OUTCOMES:
            print(f"  {k:14s} {counts[k]}")
        print(f"slowest case: {slowest[0]:.3f} s (case {slowest[1]})")
        print(f"peak RSS: {summary['peak_rss_kib']} KiB")
        if findings:
            print("distinct findings (signature: count, first case):")
            for sig, d in summary["distinct_findings"].items():
                print(f"  {d['count']:5d}  case {d['first_case']:6d}  {sig}")
        for f in findings[: args.show]:
            print(f"\n--- case {f['case']}: {f['outcome']}  ({f['replay']})")
            for m in f["mutations"]:
                print(f"  mutation: {m}")
            print(f["detail"])
    return 1 if any(counts[k] for k in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
