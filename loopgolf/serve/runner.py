"""Run tokens through a model's virtual layers one layer at a time, each token at its own depth,
over a KV cache keyed by (layer step, slot): the core that cached generation, early-exit
scoring and every serving engine share.

A token is one row. Each call to :meth:`LayerRunner.advance` moves every given token on by one
virtual layer; tokens whose next layers run the same stored sublayers go through the model in one
call (``GPT.layer`` with a virtual layer per row), so a batch may mix tokens at different depths
and a new request's prompt. Keys and values are written to the cache before any row attends, so
prompt tokens entering together attend to each other causally.

Early exit: after a token finishes a pass of the plan (``GPT.loop_exits``) the shared final norm
and head predict, and the criterion may stop it there. Later tokens still attend to that position
at the deeper virtual layers, so its cache entries there are given keys and values by the exit
state scheme (:data:`~loopgolf.serve.exits.EXIT_STATES`): ``share`` (the default) copies the entry
the token left at its last run of the same attention block (recursion-wise sharing); ``fill``
computes them from the token's exit residual through each deeper layer's own mix, norm, controls
and adapters (U-Net skip additions are not applied). ``share`` falls back to ``fill`` for a block
the token never ran (a plan's unique coda layers).
Prompt tokens exit by the same rule (their predictions are read at the exit points, then
dropped), so a served model computes for every token exactly what ``eval --early-exit`` scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loopgolf.model.gpt import GPT
from loopgolf.serve.exits import DEFAULT_EXIT_STATE, ExitCriterion, check_exit_state


@dataclass(eq=False)
class Token:
    """One token in flight: where it sits (cache slot and position), how deep it has run, and
    what it predicted once done."""

    slot: int
    pos: int
    token_id: int
    emit: bool = True  # its prediction is wanted (a prompt's last token or a generated one)
    can_exit: bool = True  # the exit criterion applies to it
    owner: Any = None  # whatever the caller keeps with it (a request)
    prev_id: int | None = None  # the token before it in its sequence (None: it is the first); the smear gate reads it
    x: Tensor | None = None  # residual (1, D)
    x0: Tensor | None = None
    layer: int = 0  # index into LayerRunner.layers of the next virtual layer to run
    skips: dict[int, Tensor] = field(default_factory=dict)  # U-Net encoder outputs waiting for their decoder layer
    prev_pred: int | None = None  # argmax at the previous pass's exit (the "agree" criterion)
    loops: int = 0  # passes run, set when done
    logits: Tensor | None = None  # (V,) float32, set when done for an emitting token
    done: bool = False


def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of queries over gathered cache keys: grouped key/value heads are read in place
    (``enable_gqa``) rather than repeated to the query heads, about 10x faster on CPU for decode
    shapes (measured: 50 rows x 160 keys, 8 query / 4 kv heads), same values."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1))


class KVCache:
    """Keys and values per (layer step, slot, position): a shared stored block run at several
    depths writes a different entry at each (one per step of ``GPT.active_layers``, so a loop
    run beyond the trained count has entries of its own). Slots are reused by whoever is given them."""

    def __init__(self, model: GPT, slots: int, max_len: int) -> None:
        cfg = model.config
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} is longer than the model's max_seq_len={cfg.max_seq_len}")
        p = next(model.parameters())
        # One flat (layer, slot) axis: gathering rows is then one index_select over a sliced
        # view, about 5x faster on CPU than advanced indexing over two axes (measured).
        shape = (len(model.active_layers) * slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.v = torch.zeros(shape, device=p.device, dtype=p.dtype)
        self.slots, self.max_len = slots, max_len

    def _rows(self, v_idx: Tensor, s_idx: Tensor) -> Tensor:
        return v_idx * self.slots + s_idx

    def copy(self, src_idx: Tensor, dst_idx: Tensor, s_idx: Tensor, p_idx: Tensor) -> None:
        """Each (slot, position)'s entry at layer step ``src_idx`` into the same slot and
        position at step ``dst_idx`` (recursion-wise sharing for exited tokens)."""
        src, dst = self._rows(src_idx, s_idx), self._rows(dst_idx, s_idx)
        self.k[dst, :, p_idx] = self.k[src, :, p_idx]
        self.v[dst, :, p_idx] = self.v[src, :, p_idx]

    def write(self, v_idx: Tensor, s_idx: Tensor, p_idx: Tensor, k: Tensor, val: Tensor) -> None:
        """Rows' keys and values (N, H_kv, 1, hd) into their (layer, slot, position) entries."""
        rows = self._rows(v_idx, s_idx)
        self.k[rows, :, p_idx] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, p_idx] = val[:, :, 0].to(self.v.dtype)

    def attend(self, v_idx: Tensor, s_idx: Tensor, p_idx: Tensor, q: Tensor) -> Tensor:
        """Each row's query (N, H, 1, hd) over its slot's keys at positions <= its own.

        A row alone at its (layer, slot) (a decoding token) gathers that slot's keys for itself.
        Rows sharing one (a prompt's tokens) gather them once and attend as one causal block: a
        prompt of n tokens copies n times fewer keys than row by row (measured: gathers were most
        of the depth-wise engine's time)."""
        rows = self._rows(v_idx, s_idx)
        _, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
        shared = counts[inverse] > 1
        if not bool(shared.any()):
            return self._attend_alone(rows, p_idx, q)
        out = torch.empty_like(q)
        alone = (~shared).nonzero()[:, 0]
        if len(alone):
            out[alone] = self._attend_alone(rows[alone], p_idx[alone], q[alone])
        idx = shared.nonzero()[:, 0]
        pair_rows, pair_of = torch.unique(rows[idx], return_inverse=True)  # (P,), (n,) in 0..P-1
        order = torch.argsort(pair_of, stable=True)
        starts = torch.searchsorted(pair_of[order], torch.arange(len(pair_rows), device=q.device))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(idx), device=q.device) - starts[pair_of[order]]
        n_pairs, width = len(pair_rows), int(rank.max()) + 1
        length = int(p_idx[idx].max()) + 1
        k = self.k[:, :, :length].index_select(0, pair_rows).to(q.dtype)
        val = self.v[:, :, :length].index_select(0, pair_rows).to(q.dtype)
        block = q.new_zeros(n_pairs, q.shape[1], width, q.shape[3])
        block[pair_of, :, rank] = q[idx, :, 0]
        q_pos = torch.zeros(n_pairs, width, dtype=p_idx.dtype, device=q.device)  # padding sees key 0 only
        q_pos[pair_of, rank] = p_idx[idx]
        mask = torch.arange(length, device=q.device)[None, None, :] <= q_pos[:, :, None]
        out[idx] = cached_attention(block, k, val, mask[:, None])[pair_of, :, rank][:, :, None]
        return out

    def _attend_alone(self, rows: Tensor, p_idx: Tensor, q: Tensor) -> Tensor:
        length = int(p_idx.max()) + 1
        k = self.k[:, :, :length].index_select(0, rows).to(q.dtype)
        val = self.v[:, :, :length].index_select(0, rows).to(q.dtype)
        mask = torch.arange(length, device=q.device)[None, :] <= p_idx[:, None]
        return cached_attention(q, k, val, mask[:, None, None, :])


class LayerRunner:
    """Moves tokens through ``model`` layer by layer over a :class:`KVCache` of ``slots`` x
    ``max_len``; ``criterion`` (None: never) decides early exits."""

    def __init__(self, model: GPT, slots: int, max_len: int, criterion: ExitCriterion | None = None, exit_state: str = DEFAULT_EXIT_STATE) -> None:
        check_exit_state(exit_state)
        self.model = model
        self.exit_state = exit_state
        self.cache = KVCache(model, slots, max_len)
        self.layers = model.active_layers  # the trained virtual layer each step runs
        self.passes = model.active_passes
        # Passes run by the time each step is done (a coda after the loops is in the last one).
        self.passes_done = tuple(max(self.passes[: j + 1]) + 1 for j in range(len(self.passes)))
        self.criterion = criterion if criterion is not None and criterion.fires else None
        self.exit_points = frozenset(model.loop_exits()) if self.criterion is not None else frozenset()  # steps
        # For a token leaving after step e, each deeper step j -> the step whose cache entry it
        # shares (the token's last step before the exit that ran j's attention block), or None
        # where its keys and values must be computed from the exit state.
        attn_of = [model.plan.attn_of[v] for v in self.layers]
        self.exit_sources = {
            e: [
                (j, next((i for i in range(e, -1, -1) if attn_of[i] == attn_of[j]), None) if exit_state == "share" else None)
                for j in range(e + 1, len(self.layers))
            ]
            for e in self.exit_points
        }
        self.device = next(model.parameters()).device
        self.has_skips = bool(model.skip_from or model.skip_sources)
        self.layer_calls = 0  # model calls made (one per group of rows per advance)
        self.layer_rows = 0  # rows those calls ran (layer_rows / layer_calls: the batch a call sees)
        self.seconds = {"layers": 0.0, "heads": 0.0, "exit_fill": 0.0}  # where the time goes

    # ------------------------------------------------------------------ helpers

    def _index(self, values: list[int]) -> Tensor:
        return torch.tensor(values, device=self.device, dtype=torch.long)

    def _rotary(self, p_idx: Tensor) -> tuple[Tensor | None, Tensor | None]:
        rot = self.model.rotary
        if rot is None:
            return None, None
        return rot.cos[0, 0][p_idx][:, None, None, :], rot.sin[0, 0][p_idx][:, None, None, :]

    def _check_position(self, t: Token) -> None:
        if not 0 <= t.pos < self.cache.max_len:
            raise ValueError(f"position {t.pos} is outside the cache's {self.cache.max_len} positions")
        if not 0 <= t.slot < self.cache.slots:
            raise ValueError(f"slot {t.slot} is outside the cache's {self.cache.slots} slots")

    # ------------------------------------------------------------------ stepping

    def start(self, tokens: list[Token]) -> None:
        """Embed new tokens (their first layer comes with the next :meth:`advance`)."""
        if not tokens:
            return
        for t in tokens:
            self._check_position(t)
        ids = self._index([t.token_id for t in tokens])[:, None]
        previous = self._index([-1 if t.prev_id is None else t.prev_id for t in tokens])[:, None]
        x = self.model.embed(ids, self._index([t.pos for t in tokens])[:, None], previous)
        for row, t in enumerate(tokens):
            t.x = t.x0 = x[row]
            t.layer, t.skips, t.prev_pred, t.done, t.logits = 0, {}, None, False, None

    def advance(self, tokens: list[Token]) -> list[Token]:
        """Run each token's next virtual layer, with the U-Net skips of the full forward applied
        per token from its own ``skips`` (``GPT.skip_in`` / ``GPT.skip_out``); returns the tokens
        that finished in this call (ran their last layer, or exited)."""
        model, plan = self.model, self.model.plan
        groups: dict[tuple[int, int], list[Token]] = {}
        for t in tokens:
            v = self.layers[t.layer]
            groups.setdefault((plan.attn_of[v], plan.mlp_of[v]), []).append(t)
        finished: list[Token] = []
        for group in groups.values():
            group.sort(key=lambda t: self.layers[t.layer])  # rows of one virtual layer contiguous
            vs = [self.layers[t.layer] for t in group]
            # Each token's residual in its layer's form (one stream or two lanes: rows of one
            # stored block can arrive in either), then its own U-Net skips.
            if self.has_skips:
                x = torch.stack([model.skip_in(v, model.lane_state(v, t.x), t.skips) for t, v in zip(group, vs)])
            else:
                x = torch.stack([model.lane_state(v, t.x) for t, v in zip(group, vs)])
            x0 = torch.stack([t.x0 for t in group])
            v_idx, s_idx, p_idx = self._index([t.layer for t in group] + [t.slot for t in group] + [t.pos for t in group]).view(3, -1)
            cos, sin = self._rotary(p_idx)

            def attend(q: Tensor, k: Tensor, val: Tensor) -> Tensor:
                self.cache.write(v_idx, s_idx, p_idx, k, val)
                return self.cache.attend(v_idx, s_idx, p_idx, q)

            t0 = time.perf_counter()
            y = model.layer(vs, x, x0, cos, sin, attend)
            self.seconds["layers"] += time.perf_counter() - t0
            self.layer_calls += 1
            self.layer_rows += len(group)
            for t, x_out in zip(group, y.unbind(0)):
                t.x = x_out
                t.layer += 1
            if self.has_skips:
                for t, v in zip(group, vs):
                    model.skip_out(v, t.x, t.skips)
            finished.extend(self._finish(group))
        return finished

    def _finish(self, group: list[Token]) -> list[Token]:
        """Predict for the rows at their last layer or at an exit point; retire those done."""
        last = len(self.layers)
        ending = [t for t in group if t.layer == last]
        probing = [t for t in group if t.layer < last and t.can_exit and t.layer - 1 in self.exit_points]
        passes = [self.passes_done[t.layer - 1] for t in probing]
        heads = [t for t in ending if t.emit] + probing
        if heads:
            t0 = time.perf_counter()
            logits = self.model.head(self.model.norm(torch.stack([self.model.merge_lanes(t.x) for t in heads]), "final_norm"))[:, 0]
            self.seconds["heads"] += time.perf_counter() - t0
            for t, row in zip(heads, logits.unbind(0)):
                t.logits = row
        exited: list[Token] = []
        if probing:
            probe_logits = logits[len(heads) - len(probing) :]
            fire = self.criterion.should_exit(probe_logits, [t.prev_pred for t in probing], passes)
            preds = probe_logits.argmax(dim=-1).tolist() if self.criterion.kind == "agree" else [None] * len(probing)
            for t, f, pred in zip(probing, fire, preds):
                if f:
                    exited.append(t)
                else:
                    t.prev_pred = pred
                    t.logits = None
            if exited:
                t0 = time.perf_counter()
                self._leave_exit_state(exited)
                self.seconds["exit_fill"] += time.perf_counter() - t0
        for t in ending:
            t.loops = self.passes_done[-1]
        for t in exited:
            t.loops = self.passes_done[t.layer - 1]
        done = ending + exited
        for t in done:
            t.done = True
            t.skips = {}
        return done

    def _leave_exit_state(self, exited: list[Token]) -> None:
        """Give the deeper layers' cache entries of exited tokens their keys and values: shared
        from the token's own earlier entry of the same attention block (``share``), else computed
        from its exit state (``fill``, and ``share`` where no earlier entry ran that block)."""
        shared: list[tuple[int, int, Token]] = []
        fill: list[tuple[int, Token]] = []
        for t in exited:
            for j, src in self.exit_sources[t.layer - 1]:
                if src is None:
                    fill.append((j, t))
                else:
                    shared.append((j, src, t))
        if shared:
            slots = self._index([t.slot for _, _, t in shared])
            self.cache.copy(
                self._index([src for _, src, _ in shared]), self._index([j for j, _, _ in shared]), slots, self._index([t.pos for _, _, t in shared])
            )
        if fill:
            self._fill_from_exit(fill)

    def _fill_from_exit(self, entries: list[tuple[int, Token]]) -> None:
        """Cache the keys and values of (layer step, exited token) pairs from the tokens' exit states."""
        # One call per stored sublayer pair (as in advance): the deeper virtual layers that run
        # the same shared block fill together, each row with its own layer's controls.
        plan = self.model.plan
        groups: dict[tuple[int, int], list[tuple[int, int, Token]]] = {}
        for j, t in entries:
            v = self.layers[j]
            groups.setdefault((plan.attn_of[v], plan.mlp_of[v]), []).append((v, j, t))
        for group in groups.values():
            group.sort(key=lambda e: e[0])  # rows of one virtual layer contiguous (adapters)
            vs = [v for v, _, _ in group]
            x = torch.stack([self.model.lane_state(v, t.x) for v, _, t in group])
            x0 = torch.stack([t.x0 for _, _, t in group])
            s_idx, p_idx = self._index([t.slot for _, _, t in group]), self._index([t.pos for _, _, t in group])
            cos, sin = self._rotary(p_idx)
            k, val = self.model.layer_kv(vs, x, x0, cos, sin)
            self.cache.write(self._index([j for _, j, _ in group]), s_idx, p_idx, k, val)

    def run(self, tokens: list[Token]) -> None:
        """Embed ``tokens`` and run them until every one is done (full depth or exit)."""
        self.start(tokens)
        pending = list(tokens)
        while pending:
            self.advance(pending)
            pending = [t for t in pending if not t.done]
