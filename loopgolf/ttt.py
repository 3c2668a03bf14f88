"""Score-first test-time training (TTT): evaluation that adapts LoRA adapters on the validation
tokens it has already scored.

The rules are the challenge's for evaluation-time adaptation, and each is a property the tests
check rather than a promise:

- causal: a target is scored by a causal forward pass over earlier tokens only;
- normalized: every score is a full softmax over the whole vocabulary;
- score first: every token is scored before any update that saw it (changing the tokens after
  position t leaves every score up to t unchanged, bit for bit), and the loop below refuses an
  update on a token it has not scored;
- one pass: each target is scored exactly once, in stream order.

Adapters are LoRA banks (``loopgolf.model.gpt.LoRABank``) attached to the model
(``GPT.attach_lora``): one adapter per *virtual* layer on each target projection, so a shared
block run at several depths specializes per depth. ``A`` starts as ``randn / sqrt(d_in)`` from
the spec's seed and ``B`` at zero (a fresh adapter changes nothing); they are trained with Adam
(betas 0.9, 0.999, eps 1e-8, no weight decay) on the mean cross-entropy of the tokens just
scored, gradients clipped to norm 1; the model's own weights are frozen.

Two ways to carry the adapters (``reset``):

- ``none`` (phases over the stream): the official scoring windows (the same windows, batches and
  sums as plain evaluation, so ``lr=0`` reproduces its val_bpb bit for bit) in order; each batch
  of ``--batch-size`` windows is one phase: scored, then trained on for ``steps`` steps. The
  adapters carry across documents.
- ``doc`` (per document): each document (a BOS and the tokens up to the next BOS, which is its
  last target) is scored on its own in chunks of ``chunk`` targets, each with the document's
  preceding tokens as context (at most ``seq_len``); the adapters return to their initial state
  (and Adam to a fresh state) at every document and are trained on each chunk once it is scored.
  Documents do not see each other, so this mode scores a little worse before adaptation than
  the stream; its no-TTT baseline is the same document-wise scoring.

``eval_time`` bounds the evaluation: once that many seconds have passed, adaptation stops and
scoring goes on with the adapters as they are.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from loopgolf.data.shards import BOS_ID
from loopgolf.data.tokenizer import ByteTables
from loopgolf.evaluate import EvalResult, Tally, check_eval_args, scoring_windows, token_nll, window_batches
from loopgolf.model.gpt import GPT, LoRABank

RESETS = ("none", "doc")
TTT_SYNTAX = "rank=R,lr=LR[,targets=q+v+...|all][,reset=none|doc][,steps=N][,chunk=T][,seed=S] (e.g. rank=8,lr=0.003)"
MAX_TTT_RANK = 1024
MAX_TTT_STEPS = 1000
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class TTTSpec:
    """What test-time training does (see the module docstring)."""

    rank: int = 8
    lr: float = 3e-3
    targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    reset: str = "none"
    steps: int = 1  # optimizer steps on each scored phase (reset=none) or chunk (reset=doc)
    chunk: int = 32  # targets per chunk (reset=doc)
    seed: int = 0  # the adapters' initial A

    def __post_init__(self) -> None:
        for name, lo, hi in (("rank", 1, MAX_TTT_RANK), ("steps", 1, MAX_TTT_STEPS), ("chunk", 1, 1 << 20), ("seed", 0, 2**63 - 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"ttt {name} must be an integer in [{lo}, {hi}], got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or not 0 <= self.lr <= 10:
            raise ValueError(f"ttt lr must be a finite number in [0, 10], got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        if self.reset not in RESETS:
            raise ValueError(f"ttt reset must be one of {', '.join(RESETS)}, got {self.reset!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or len(set(self.targets)) != len(self.targets) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"ttt targets must be distinct projection names, got {self.targets!r}")

    @classmethod
    def parse(cls, text: str) -> TTTSpec:
        """``rank=8,lr=0.003,targets=q+v,reset=doc`` (see TTT_SYNTAX); unnamed fields keep their
        defaults. ``targets=all`` is every projection the model has."""
        values: dict = {}
        names = {f.name: f for f in fields(cls)}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in names or not value:
                raise ValueError(f"cannot parse --ttt {text!r}: expected {TTT_SYNTAX}")
            if key in values:
                raise ValueError(f"--ttt names {key} twice")
            try:
                if key == "targets":
                    values[key] = ("all",) if value == "all" else tuple(t.strip() for t in value.split("+"))
                elif key == "reset":
                    values[key] = value
                elif key == "lr":
                    values[key] = float(value)
                else:
                    values[key] = int(value)
            except ValueError:
                raise ValueError(f"--ttt {key}={value!r} is not a number; expected {TTT_SYNTAX}") from None
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict) -> TTTSpec:
        if not isinstance(d, dict) or set(d) - {f.name for f in fields(cls)}:
            raise ValueError(f"a ttt spec is an object with fields {', '.join(f.name for f in fields(cls))}, got {d!r}")
        return cls(**{**d, **({"targets": tuple(d["targets"])} if isinstance(d.get("targets"), list) else {})})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    def __str__(self) -> str:
        return f"rank={self.rank},lr={self.lr:g},targets={'+'.join(self.targets)},reset={self.reset},steps={self.steps},chunk={self.chunk},seed={self.seed}"

    def targets_for(self, model: GPT) -> tuple[str, ...]:
        """The projections adapted (``all``: every one the model has)."""
        if self.targets == ("all",):
            return model.config.projections
        for t in self.targets:
            if t not in model.config.projections:
                raise ValueError(f"ttt target {t!r} is not a projection of this model; valid: all, {', '.join(model.config.projections)}")
        return self.targets


@dataclass
class TTTResult:
    """val_bpb with TTT (``adapted``) and without it on the same windows (``base``, when asked
    for), the evaluation's seconds (scoring and adapting; the base scoring is timed apart), and
    how much adaptation happened."""

    adapted: EvalResult
    base: EvalResult | None
    spec: TTTSpec
    seconds: float
    base_seconds: float | None
    tokens_adapted: int  # target tokens in the updates (summed over steps)
    updates: int  # optimizer steps taken
    adapting_stopped_at: int | None  # stream position scored when eval_time ran out (None: it never did)
    scores: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)  # (positions, nll) per scored batch

    @property
    def gain(self) -> float | None:
        """val_bpb without TTT minus with it (positive: TTT helped)."""
        return None if self.base is None else self.base.val_bpb - self.adapted.val_bpb

    def to_dict(self) -> dict:
        return {
            **self.adapted.to_dict(),
            "ttt": str(self.spec),
            "val_bpb_without_ttt": None if self.base is None else self.base.val_bpb,
            "ttt_gain": self.gain,
            "eval_seconds": self.seconds,
            "eval_seconds_without_ttt": self.base_seconds,
            "tokens_adapted": self.tokens_adapted,
            "updates": self.updates,
            "adapting_stopped_at": self.adapting_stopped_at,
        }


class Adaptation:
    """The attached adapters, their optimizer and the score-first bookkeeping."""

    def __init__(self, model: GPT, spec: TTTSpec, device: torch.device) -> None:
        self.model, self.spec, self.device = model, spec, device
        cfg = model.config
        gen = torch.Generator().manual_seed(spec.seed)
        self.banks = {t: LoRABank(model.plan.num_virtual, *cfg.lora_shape(t), spec.rank, 1.0).to(device) for t in spec.targets_for(model)}
        self.initial_a = []
        for bank in self.banks.values():
            for a in bank.A:
                with torch.no_grad():
                    a.copy_(torch.randn(a.shape, generator=gen) / a.shape[0] ** 0.5)
                self.initial_a.append(a.detach().clone())
        self.params = [p for bank in self.banks.values() for p in bank.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.scored_to = 0  # every stream position below this has been scored
        self.tokens_adapted = 0
        self.updates = 0

    def reset(self) -> None:
        """Back to the initial adapters and a fresh optimizer state."""
        with torch.no_grad():
            a_params = [a for bank in self.banks.values() for a in bank.A]
            for a, init in zip(a_params, self.initial_a):
                a.copy_(init)
            for bank in self.banks.values():
                for b in bank.B:
                    b.zero_()
        self.optimizer.state.clear()

    def scored(self, end: int) -> None:
        """Stream positions < ``end`` have been scored."""
        self.scored_to = max(self.scored_to, end)

    def update(self, x: np.ndarray, y: np.ndarray, valid: np.ndarray, last_position: int) -> None:
        """``steps`` optimizer steps on the mean loss of the ``valid`` targets of (x, y), whose
        last stream position is ``last_position``; refused unless that token has been scored."""
        if last_position >= self.scored_to:
            raise AssertionError(f"score-first violated: an update would train on position {last_position} before it is scored (scored < {self.scored_to})")
        m = torch.from_numpy(valid).to(self.device)
        for _ in range(self.spec.steps):
            loss = token_nll(self.model, x, y, self.device)[m].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            self.tokens_adapted += int(valid.sum())


def _score(model: GPT, x: np.ndarray, y: np.ndarray, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return token_nll(model, x, y, device)


def documents(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) stream positions of each document: a document starts at a BOS (or at 0) and
    its last target is the next document's BOS (or the stream's last token)."""
    starts = np.flatnonzero(tokens == BOS_ID).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [len(tokens) - 1]
    return [(s, e) for s, e in zip(starts, ends) if e > s]


def evaluate_ttt(
    model: GPT,
    tokens: np.ndarray,
    tables: ByteTables,
    seq_len: int,
    spec: TTTSpec,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    eval_time: float | None = None,
    baseline: bool = True,
    keep_scores: bool = False,
    progress: bool = False,
) -> TTTResult:
    """Score ``tokens`` with score-first test-time training (see the module docstring).
    ``baseline`` also scores every window without the adapters (timed apart), for the gain;
    ``keep_scores`` keeps each scored target's stream position and loss (for tests)."""
    if eval_time is not None and not (math.isfinite(eval_time) and eval_time > 0):
        raise ValueError(f"eval_time must be a positive number of seconds, got {eval_time}")
    tokens, stride = check_eval_args(tokens, seq_len, stride, max_tokens)
    if spec.reset == "doc" and stride != seq_len:
        raise ValueError("ttt reset=doc scores each document in chunks of its own (chunk=T); leave out --stride")
    if spec.reset == "doc" and spec.chunk > seq_len:
        raise ValueError(f"ttt chunk={spec.chunk} is longer than the evaluation window seq_len={seq_len}")
    device = torch.device(device)
    vocab = int(tables.base_bytes.shape[0])
    if int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} is outside the tokenizer's {vocab}-entry byte table")
    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    ttt = Adaptation(model, spec, device)
    tally, base_tally = Tally(tables), Tally(tables) if baseline else None
    scores: list[tuple[np.ndarray, np.ndarray]] = []
    t_start, base_seconds, stopped_at = time.perf_counter(), 0.0, None

    def score(x: np.ndarray, y: np.ndarray, mask: np.ndarray, positions: np.ndarray, where: str) -> None:
        nonlocal base_seconds
        nll = _score(model, x, y, device)
        tally.add(nll, x, y, mask, where, positions)
        if keep_scores:
            scores.append((positions, nll[torch.from_numpy(mask).to(nll.device)].double().cpu().numpy()))
        ttt.scored(int(positions.max()) + 1)
        if base_tally is not None:
            t0 = time.perf_counter()
            model.attach_lora(None)
            base_tally.add(_score(model, x, y, device), x, y, mask, where, positions)
            model.attach_lora(ttt.banks)
            base_seconds += time.perf_counter() - t0

    def adapting() -> bool:
        nonlocal stopped_at
        if stopped_at is None and eval_time is not None and time.perf_counter() - t_start - base_seconds >= eval_time:
            stopped_at = ttt.scored_to
        return stopped_at is None

    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    model.attach_lora(ttt.banks)
    bar = None
    try:
        if spec.reset == "none":
            windows = scoring_windows(len(tokens), seq_len, stride)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(windows), desc="eval+ttt", unit="window", leave=False)
            for batch, wins in window_batches(tokens, windows, batch_size, vocab):
                positions = batch.target_positions(wins)
                score(batch.x, batch.y, batch.mask, positions, f"the windows starting at token {batch.first_token:,} (batch {batch.index + 1})")
                if adapting():
                    # Every target of these windows is scored by now: this batch's, and the
                    # context targets earlier windows scored.
                    lengths = np.array([end - start for start, end, _ in wins])
                    valid = np.arange(batch.x.shape[1])[None, :] < lengths[:, None]
                    ttt.update(batch.x, batch.y, valid, max(end for _, end, _ in wins))
                if bar is not None:
                    bar.update(len(wins))
        else:
            docs = documents(tokens)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(docs), desc="eval+ttt", unit="doc", leave=False)
            for d, (first, last) in enumerate(docs):
                ttt.reset()
                for c0 in range(first, last, spec.chunk):
                    c1 = min(c0 + spec.chunk, last)  # targets at positions c0+1 .. c1
                    # The window's start must not depend on where the document ends (a later
                    # token): it is set by the chunk's nominal end.
                    w0 = max(first, c0 + spec.chunk - seq_len)
                    x, y = tokens[w0:c1][None].astype(np.int64), tokens[w0 + 1 : c1 + 1][None].astype(np.int64)
                    mask = np.zeros(x.shape, dtype=bool)
                    mask[0, c0 - w0 :] = True
                    score(x, y, mask, np.arange(c0 + 1, c1 + 1), f"document {d + 1} (tokens {first:,}..{last:,})")
                    if c1 < last and adapting():  # nothing later in this document to help
                        ttt.update(x, y, np.ones(x.shape, dtype=bool), c1)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.attach_lora(None)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    seconds = time.perf_counter() - t_start - base_seconds
    return TTTResult(
        adapted=tally.result(seq_len, stride),
        base=None if base_tally is None else base_tally.result(seq_len, stride),
        spec=spec,
        seconds=seconds,
        base_seconds=base_seconds if baseline else None,
        tokens_adapted=ttt.tokens_adapted,
        updates=ttt.updates,
        adapting_stopped_at=stopped_at,
        scores=scores,
    )
