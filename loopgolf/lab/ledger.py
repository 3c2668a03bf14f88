"""A ledger: the variants of one question, the seeds, one cap and one training budget.

A ledger is a TOML file (or the name of a built-in one in ``loopgolf/lab/ledgers/``)::

    name = "cpu-seed"
    description = "..."
    baseline = "vanilla"        # the variant every other is tested against
    seeds = [1]                 # default seeds of every variant
    cap_bytes = 16000000
    data = "default"            # "default" (the embedded corpus) or a dataset directory

    [budget]                    # exactly one of: steps, tokens, seconds, flops
    flops = 2.0e14              # training FLOPs per run (3 x forward FLOPs per token x tokens)

    [[variant]]
    name = "vanilla"
    preset = "cpu-vanilla"
    seeds = [1, 2, 3]           # optional: replaces the default seeds
    model = { model_dim = 256 } # optional ModelConfig overrides
    train = { seq_len = 128 }   # optional TrainConfig overrides
    budget = { steps = 200 }    # optional: replaces the ledger's budget for this variant
    quant = "int6,gptq"         # optional: the export policy (default: the preset's)
    family = "vanilla"          # optional: a frontier ledger's design family ...
    model_cap_bytes = 400000    # ... and the model-byte cap the variant was sized for

A frontier ledger gives every variant a ``family`` and a ``model_cap_bytes``; its report draws
val_bpb against the cap, one line per family, and tests each cap's best family against the
baseline's family at that cap (:mod:`loopgolf.lab.frontier`). The runs themselves are held to the
ledger's ``cap_bytes`` (model and code); ``model_cap_bytes`` is checked in the report against
each run's model bytes, so a variant that outgrew its cap is named there, not silently counted.

TOML has no null: an override written as the string ``"null"`` sets the field to None (``train =
{ ema_decay = "null" }`` turns a preset's weight average off).

A ``flops`` or ``tokens`` budget becomes a step count per variant (rounded to the nearest step, at
least 1), so variants of different cost train on the same compute or the same tokens. FLOPs count
the full plan at every step (a progressive-recurrence variant's early, shallower steps are counted
as full depth, so it gets slightly less compute than the others).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

BUDGET_KINDS = ("steps", "tokens", "seconds", "flops")
_TOP_KEYS = {"name", "description", "baseline", "seeds", "cap_bytes", "data", "budget", "variant"}
_VARIANT_KEYS = {"name", "preset", "seeds", "model", "train", "description", "budget", "family", "model_cap_bytes", "quant"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class LedgerError(ValueError):
    """A malformed ledger: the message names the file, the line (when known) and the key."""


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    seeds: tuple[int, ...]
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    budget: tuple[str, float] | None = None  # (kind, amount) replacing the ledger's
    family: str = ""  # a frontier ledger's design family (vanilla, shared, ...)
    model_cap_bytes: int | None = None  # the model-byte cap a frontier variant was sized for
    quant: str | None = None  # export policy (parse_policy syntax); None: the preset's


@dataclass(frozen=True)
class Ledger:
    name: str
    description: str
    baseline: str
    cap_bytes: int
    budget_kind: str
    budget: float
    variants: tuple[Variant, ...]
    data: str = "default"
    source: str = ""  # the file it was read from

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise LedgerError(f"ledger {self.name!r} has no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}")


def builtin_ledgers() -> dict[str, str]:
    """``name -> TOML text`` of the ledgers shipped with loopgolf."""
    root = resources.files("loopgolf.lab") / "ledgers"
    return {p.name[: -len(".toml")]: p.read_text(encoding="utf-8") for p in root.iterdir() if p.name.endswith(".toml")}


def load_ledger(name_or_path: str | Path) -> Ledger:
    """A built-in ledger by name, or a TOML file."""
    text_by_name = builtin_ledgers()
    key = str(name_or_path)
    if key in text_by_name and not Path(key).exists():
        return parse_ledger(text_by_name[key], source=f"<built-in {key}>")
    path = Path(name_or_path)
    if not path.is_file():
        raise LedgerError(f"no ledger file {path} and no built-in ledger of that name (built-in: {', '.join(sorted(text_by_name))})")
    return parse_ledger(path.read_text(encoding="utf-8"), source=str(path))


def _line_of(text: str, key: str, table: str | None = None, index: int = 0) -> int | None:
    """The 1-based line where ``key`` is assigned: at the top level (``table`` None), in
    ``[table]``, or in the ``index``-th ``[[table]]``; inline tables (``model = { key = ...}``)
    are searched on their line."""
    current: str | None = None
    seen = -1
    assign = re.compile(rf"^\s*(\"{re.escape(key)}\"|{re.escape(key)})\s*=|[{{,]\s*{re.escape(key)}\s*=")
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
        if header:
            current = header.group(1)
            if s.startswith("[[") and current == table:
                seen += 1
            continue
        in_table = current is not None and table is not None and (current == table or current.startswith(table + "."))  # [variant.model] too
        in_place = current is None if table is None else in_table and (not _is_array_table(text, table) or seen == index)
        if in_place and assign.search(line):
            return i
    return None


def _is_array_table(text: str, table: str) -> bool:
    return re.search(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]", text, re.M) is not None


def parse_ledger(text: str, source: str = "<ledger>") -> Ledger:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LedgerError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise LedgerError(f"{source}: not a ledger: its arrays or tables are nested too deeply") from None

    def fail(message: str, key: str, table: str | None = None, index: int = 0, sub: str | None = None) -> LedgerError:
        """An error at ``key`` (of ``table``, the ``index``-th if an array of tables; of its
        ``sub`` table, as in ``variant[1].model.colour``)."""
        line = _line_of(text, key, table, index)
        where = f"{source}, line {line}" if line else source
        name = key if sub is None else f"{sub}.{key}"
        path = name if table is None else (f"{table}[{index}].{name}" if _is_array_table(text, table) else f"{table}.{name}")
        return LedgerError(f"{where}: key {path!r}: {message}")

    for k in doc:
        if k not in _TOP_KEYS:
            raise fail(f"unknown key; valid: {', '.join(sorted(_TOP_KEYS))}", k)
    for k in ("name", "baseline", "budget", "variant"):
        if k not in doc:
            raise LedgerError(f"{source}: missing required key {k!r}")
    name = doc["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("must be a name of letters, digits, '.', '_' or '-'", "name")
    for k in ("baseline", "description"):
        if k in doc and not isinstance(doc[k], str):
            raise fail(f"must be a string, got {type(doc[k]).__name__}", k)
    default_seeds = _seeds(doc.get("seeds", [1]), lambda m: fail(m, "seeds"))
    cap = doc.get("cap_bytes", 16_000_000)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
        raise fail(f"must be a positive integer, got {cap!r}", "cap_bytes")
    data = doc.get("data", "default")
    if not isinstance(data, str) or not data:
        raise fail('must be "default" or a dataset directory', "data")

    def read_budget(budget: Any, fail_at) -> tuple[str, float]:
        """``(kind, amount)`` of a budget table; ``fail_at(message, key)`` names the place."""
        if not isinstance(budget, dict):
            raise fail_at("must be a table with one of " + ", ".join(BUDGET_KINDS), "budget")
        for k in budget:
            if k not in BUDGET_KINDS:
                raise fail_at(f"unknown budget; valid: {', '.join(BUDGET_KINDS)}", k)
        if len(budget) != 1:
            raise fail_at(f"needs exactly one of {', '.join(BUDGET_KINDS)}, got {len(budget)}", "budget")
        ((kind, amount),) = budget.items()
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount <= 0:
            raise fail_at(f"must be a positive number, got {amount!r}", kind)
        if kind == "steps" and not isinstance(amount, int):
            raise fail_at(f"must be an integer number of steps, got {amount!r}", kind)
        return kind, float(amount)

    kind, amount = read_budget(doc["budget"], lambda m, k: fail(m, k, None if k == "budget" else "budget"))

    raw_variants = doc["variant"]
    if not isinstance(raw_variants, list) or not raw_variants or not all(isinstance(v, dict) for v in raw_variants):
        raise fail("must be one or more [[variant]] tables", "variant")
    variants = []
    for i, v in enumerate(raw_variants):
        for k in v:
            if k not in _VARIANT_KEYS:
                raise fail(f"unknown key; valid: {', '.join(sorted(_VARIANT_KEYS))}", k, "variant", i)
        for k in ("name", "preset"):
            if not isinstance(v.get(k), str) or not v[k]:
                raise fail("required, a non-empty string", k, "variant", i) if k in v else LedgerError(f"{source}: variant {i + 1} has no {k!r}")
        if not _NAME.match(v["name"]):
            raise fail("must be a name of letters, digits, '.', '_' or '-'", "name", "variant", i)
        if any(p.name == v["name"] for p in variants):
            raise fail(f"variant {v['name']!r} is defined twice", "name", "variant", i)
        for k in ("model", "train"):
            if not isinstance(v.get(k, {}), dict):
                raise fail("must be a table of overrides", k, "variant", i)
        if not isinstance(v.get("description", ""), str):
            raise fail("must be a string", "description", "variant", i)
        if "quant" in v:
            from loopgolf.export.quantize import parse_policy

            if not isinstance(v["quant"], str):
                raise fail(f'must be a policy string such as "int6,gptq", got {type(v["quant"]).__name__}', "quant", "variant", i)
            try:
                parse_policy(v["quant"])
            except ValueError as e:
                raise fail(str(e), "quant", "variant", i) from None
        for sub, key, valid in _unknown_overrides(v.get("model", {}), v.get("train", {})):
            raise fail(f"unknown {sub.replace('.', ' ')} field; valid: {', '.join(valid)}", key, "variant", i, sub=sub)
        if "family" in v and (not isinstance(v["family"], str) or not _NAME.match(v["family"])):
            raise fail("must be a name of letters, digits, '.', '_' or '-'", "family", "variant", i)
        model_cap = v.get("model_cap_bytes")
        if model_cap is not None and (isinstance(model_cap, bool) or not isinstance(model_cap, int) or model_cap <= 0):
            raise fail(f"must be a positive integer, got {model_cap!r:.80}", "model_cap_bytes", "variant", i)
        if ("family" in v) != (model_cap is not None):
            raise fail("a frontier variant needs both family and model_cap_bytes", "family" if "family" in v else "model_cap_bytes", "variant", i)
        seeds = _seeds(v["seeds"], lambda m: fail(m, "seeds", "variant", i)) if "seeds" in v else default_seeds
        own_budget = read_budget(v["budget"], lambda m, k: fail(m, k, "variant", i, sub=None if k == "budget" else "budget")) if "budget" in v else None
        variants.append(
            Variant(
                v["name"],
                v["preset"],
                seeds,
                _nulls(v.get("model", {})),
                _nulls(v.get("train", {})),
                str(v.get("description", "")),
                own_budget,
                v.get("family", ""),
                model_cap,
                v.get("quant"),
            )
        )
    unplaced = [v.name for v in variants if not v.family]
    if len(unplaced) not in (0, len(variants)):
        raise LedgerError(f"{source}: a frontier ledger places every variant: {', '.join(unplaced)} have no family and model_cap_bytes")
    if doc["baseline"] not in {v.name for v in variants}:
        raise fail(f"names no variant (variants: {', '.join(v.name for v in variants)})", "baseline")
    ledger = Ledger(name, str(doc.get("description", "")), doc["baseline"], cap, kind, amount, tuple(variants), data, source)
    for i, v in enumerate(variants):  # the presets and overrides must build now, not hours into a sweep
        try:
            resolve(ledger, v)
        except (ValueError, TypeError) as e:
            raise fail(f"does not build: {e}", "preset", "variant", i) from None
        except RecursionError:
            raise fail("does not build: its overrides are nested too deeply", "preset", "variant", i) from None
    return ledger


def _nulls(table: dict[str, Any]) -> dict[str, Any]:
    """Overrides with each ``"null"`` string (TOML has no null) made None, in nested tables too."""
    return {k: None if v == "null" else _nulls(v) if isinstance(v, dict) else v for k, v in table.items()}


def _unknown_overrides(model: dict[str, Any], train: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """``(table, key, valid keys)`` of every override that names no config field: ``model`` keys
    are ModelConfig fields, ``train`` keys TrainConfig fields (``optim``: OptimizerConfig's)."""
    from dataclasses import fields

    from loopgolf.config import OptimizerConfig, TrainConfig
    from loopgolf.model.gpt import ModelConfig

    out = []
    for sub, table, cls in (("model", model, ModelConfig), ("train", train, TrainConfig)):
        valid = sorted(f.name for f in fields(cls))
        out += [(sub, k, valid) for k in table if k not in valid]
    optim = train.get("optim")
    if isinstance(optim, dict):
        valid = sorted(f.name for f in fields(OptimizerConfig))
        out += [("train.optim", k, valid) for k in optim if k not in valid]
    return out


def _seeds(value: Any, fail) -> tuple[int, ...]:
    from loopgolf.config import MAX_SEED

    if not isinstance(value, list) or not value or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in value):
        raise fail(f"must be a non-empty list of integers from 0 to 2**63 - 1, got {value!r:.80}")
    if len(set(value)) != len(value):
        raise fail(f"repeats a seed: {value!r:.80}")
    return tuple(value)


@dataclass(frozen=True)
class ResolvedVariant:
    """What a variant runs: its preset and overrides as ``RunOptions`` fields, and its budget."""

    variant: Variant
    max_steps: int | None
    time_budget: float | None
    forward_flops_per_token: int
    batch_tokens: int

    def train_flops(self, steps: int) -> float:
        return 3.0 * self.forward_flops_per_token * self.batch_tokens * steps


def resolve(ledger: Ledger, variant: Variant) -> ResolvedVariant:
    """The variant's model and budget (raises ValueError if the preset or overrides are bad)."""
    from loopgolf.model.gpt import forward_flops_per_token
    from loopgolf.run import RunOptions, build_config

    preset = build_config(RunOptions(preset=variant.preset, model_overrides=variant.model, train_overrides=variant.train, quant=variant.quant, progress=False))
    fwd = forward_flops_per_token(preset.model, preset.train.seq_len)
    batch = preset.train.batch_tokens
    steps: int | None = None
    seconds: float | None = None
    kind, amount = variant.budget or (ledger.budget_kind, ledger.budget)
    if kind == "steps":
        steps = int(amount)
    elif kind == "tokens":
        steps = max(1, round(amount / batch))
    elif kind == "flops":
        steps = max(1, round(amount / (3.0 * fwd * batch)))
    else:
        seconds = amount
    return ResolvedVariant(variant, steps, seconds, fwd, batch)
