"""Shard format, shard discovery and the streaming TokenLoader."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopgolf.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardError,
    TokenLoader,
    find_shards,
    load_shard,
    load_tokens,
    read_shard_header,
    write_shard,
)

# ---------------------------------------------------------------------------------------------
# format
# ---------------------------------------------------------------------------------------------


def test_write_shard_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    write_shard(path, [1, 258, 65535])
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 6
    # little-endian int32 magic / version / count, then zeros
    assert raw[:12] == (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert raw[12:HEADER_BYTES] == bytes(HEADER_BYTES - 12)
    # little-endian uint16 body
    assert raw[HEADER_BYTES:] == bytes([1, 0, 2, 1, 255, 255])


@pytest.mark.parametrize("mmap", [True, False])
def test_roundtrip(tmp_path: Path, mmap: bool) -> None:
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000)
    path = tmp_path / "s.bin"
    write_shard(path, tokens, vocab_size=65536)
    assert read_shard_header(path) == 1000
    loaded = load_shard(path, mmap=mmap)
    assert loaded.dtype == np.uint16
    assert isinstance(loaded, np.memmap) == mmap
    np.testing.assert_array_equal(loaded, tokens)


def test_empty_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "e.bin", [])
    assert read_shard_header(tmp_path / "e.bin") == 0
    assert len(load_shard(tmp_path / "e.bin")) == 0


@pytest.mark.parametrize(
    "tokens, vocab, match",
    [
        ([1, -1], None, "token id -1 is outside"),
        ([1, 65536], None, "token id 65536 is outside"),
        ([1, 1024], 1024, "token id 1024 >= vocab_size 1024"),
        (np.array([1.0, 2.0]), None, "must be integers"),
        (np.zeros((2, 2), dtype=np.int64), None, "1-D"),
    ],
)
def test_write_rejects_bad_tokens_and_writes_nothing(tmp_path: Path, tokens, vocab, match) -> None:
    path = tmp_path / "bad.bin"
    with pytest.raises(ShardError, match=match):
        write_shard(path, tokens, vocab_size=vocab)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file left behind


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3])
    with pytest.raises(ShardError):
        write_shard(path, [1, 70000])
    np.testing.assert_array_equal(load_shard(path), [1, 2, 3])


def _corrupt(path: Path, *, magic: int = SHARD_MAGIC, version: int = 1, count: int = 4, body: int = 4) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, count
    path.write_bytes(header.tobytes() + np.arange(body, dtype="<u2").tobytes())
    return path


def test_header_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="does not exist"):
        read_shard_header(tmp_path / "missing.bin")
    (tmp_path / "short.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match="header is 100 bytes"):
        read_shard_header(tmp_path / "short.bin")
    with pytest.raises(ShardError, match="wrong magic number 123"):
        read_shard_header(_corrupt(tmp_path / "m.bin", magic=123))
    with pytest.raises(ShardError, match="unsupported version 2"):
        read_shard_header(_corrupt(tmp_path / "v.bin", version=2))
    with pytest.raises(ShardError, match=r"1030 bytes .* 4 tokens \(1032 bytes\).*truncated"):
        read_shard_header(_corrupt(tmp_path / "t.bin", body=3))
    with pytest.raises(ShardError, match=r"1034 bytes .*over-long"):
        read_shard_header(_corrupt(tmp_path / "o.bin", body=5))
    # the message names the file
    with pytest.raises(ShardError, match="o.bin"):
        load_shard(tmp_path / "o.bin")


def test_load_shard_vocab_mismatch(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.bin", [1, 5, 9000, 3])
    assert len(load_shard(tmp_path / "s.bin", vocab_size=9001)) == 4
    with pytest.raises(ShardError, match=r"token id 9000 >= vocab_size 8192.*does not match"):
        load_shard(tmp_path / "s.bin", vocab_size=8192)


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------


def test_find_shards(tmp_path: Path) -> None:
    for name in ["fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin"]:
        write_shard(tmp_path / name, [1, 2])
    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
    ]
    assert [p.name for p in find_shards(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]
    assert [p.name for p in find_shards(f"{tmp_path}/fineweb_{{split}}_*.bin", "val")] == ["fineweb_val_000000.bin"]
    assert len(find_shards(str(tmp_path / "*.bin"), "train")) == 3
    listed = [tmp_path / "fineweb_val_000000.bin", tmp_path / "fineweb_train_000000.bin"]
    assert find_shards(listed, "train") == listed  # a list keeps its order
    with pytest.raises(ValueError, match=f"fineweb_test_\\*.bin shards in directory {tmp_path}"):
        find_shards(tmp_path, "test")
    with pytest.raises(ValueError, match="not found: .*nope.bin"):
        find_shards([tmp_path / "nope.bin"], "train")
    with pytest.raises(ValueError, match="does not exist"):
        find_shards(tmp_path / "absent_dir", "train")


def test_load_tokens_concatenates(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.bin", [1, 2, 3])
    write_shard(tmp_path / "b.bin", [1, 4])
    out = load_tokens([tmp_path / "a.bin", tmp_path / "b.bin"], vocab_size=5)
    assert out.dtype == np.uint16 and not isinstance(out, np.memmap)
    np.testing.assert_array_equal(out, [1, 2, 3, 1, 4])
    with pytest.raises(ShardError, match="token id 4 >= vocab_size 4"):
        load_tokens([tmp_path / "a.bin", tmp_path / "b.bin"], vocab_size=4)


# ---------------------------------------------------------------------------------------------
# TokenLoader
# ---------------------------------------------------------------------------------------------


def _make_stream(directory: Path, lengths: list[int]) -> tuple[list[Path], np.ndarray]:
    """Shards whose tokens are all distinct (0, 1, 2, ...), so every token names its position."""
    paths, start = [], 0
    for i, n in enumerate(lengths):
        path = directory / f"fineweb_train_{i:06d}.bin"
        write_shard(path, np.arange(start, start + n))
        paths.append(path)
        start += n
    return paths, np.arange(start)


def _span(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Rebuild the contiguous span a batch was cut from (and check y is x shifted by one)."""
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    assert torch.equal(flat_x[1:], flat_y[:-1])
    return torch.cat([flat_x, flat_y[-1:]]).numpy()


def _stream_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The stream a sequence of consecutive batches covers: the first input, then every target."""
    first = batches[0][0].reshape(-1)[:1].numpy()
    return np.concatenate([first, *[y.reshape(-1).numpy() for _, y in batches]])


def test_loader_stream_crosses_shards_and_wraps(tmp_path: Path) -> None:
    paths, stream = _make_stream(tmp_path, [7, 0, 5, 11])  # an empty shard is skipped
    loader = TokenLoader(paths, seq_len=3)
    expected = np.concatenate([stream] * 5)
    pos = 0
    for _ in range(12):
        x, y = loader.next_batch(6)
        assert x.shape == y.shape == (2, 3) and x.dtype == torch.int64
        np.testing.assert_array_equal(_span(x, y), expected[pos : pos + 7])
        pos += 6  # consecutive spans share one token: the last target is the next first input
    assert loader.epoch == pos // len(stream) == 3
    assert loader.tokens_seen == pos


def test_loader_batch_larger_than_dataset(tmp_path: Path) -> None:
    paths, stream = _make_stream(tmp_path, [3, 2])
    x, y = TokenLoader(paths, seq_len=4).next_batch(12)
    np.testing.assert_array_equal(_span(x, y), np.concatenate([stream] * 3)[:13])


def test_loader_ranks_are_disjoint_slices_of_the_single_process_stream(tmp_path: Path) -> None:
    """With world_size=W, rank r at step k gets exactly batch W*k + r of a world_size=1 loader."""
    paths, _ = _make_stream(tmp_path, [50, 13, 80])
    seq_len, local = 4, 8
    single = TokenLoader(paths, seq_len)
    ranks = [TokenLoader(paths, seq_len, rank=r, world_size=3) for r in range(3)]
    seen: list[set[int]] = []
    for _ in range(5):
        for loader in ranks:
            x_ref, y_ref = single.next_batch(local)
            x, y = loader.next_batch(local)
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            seen.append(set(y.reshape(-1).tolist()))
    # within one pass over the data (15 spans of 8 targets < 143), no token is a target twice
    assert sum(map(len, seen)) == len(set().union(*seen)) == 15 * 8


def test_loader_seeded_is_deterministic_and_a_shard_permutation(tmp_path: Path) -> None:
    lengths = [20, 30, 25, 15, 10]
    paths, stream = _make_stream(tmp_path, lengths)
    starts = np.cumsum([0, *lengths])

    def take(seed: int | None, steps: int = 12) -> np.ndarray:
        loader = TokenLoader(paths, seq_len=5, seed=seed)
        return _stream_of([loader.next_batch(10) for _ in range(steps)])

    np.testing.assert_array_equal(take(0), take(0))
    assert not np.array_equal(take(0), take(1))
    np.testing.assert_array_equal(take(None), np.concatenate([stream] * 2)[:121])
    # a seeded stream is whole shards (except the first, entered at an offset), each run in order
    tokens = take(3)
    shard_of = np.searchsorted(starts, tokens, side="right") - 1
    breaks = np.flatnonzero((np.diff(tokens) != 1) | (np.diff(shard_of) != 0)) + 1
    runs = np.split(tokens, breaks)
    for i, run in enumerate(runs):
        shard = np.searchsorted(starts, run[0], side="right") - 1
        if 0 < i < len(runs) - 1:
            assert run[0] == starts[shard] and len(run) == lengths[shard]
    first_epoch = [np.searchsorted(starts, r[0], side="right") - 1 for r in runs[: len(lengths)]]
    assert sorted(first_epoch) == list(range(len(lengths)))


def test_loader_resume_is_exact(tmp_path: Path) -> None:
    paths, _ = _make_stream(tmp_path, [17, 9, 23])
    for seed in (None, 5):
        a = TokenLoader(paths, seq_len=4, rank=1, world_size=2, seed=seed)
        for _ in range(7):
            a.next_batch(8)
        state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
        b = TokenLoader(paths, seq_len=4, rank=1, world_size=2, seed=seed)
        b.load_state_dict(state)
        for _ in range(10):
            xa, ya = a.next_batch(8)
            xb, yb = b.next_batch(8)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert a.state_dict() == b.state_dict()


def test_loader_state_mismatch_and_bad_arguments(tmp_path: Path) -> None:
    paths, _ = _make_stream(tmp_path, [10, 10])
    state = TokenLoader(paths, seq_len=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        TokenLoader(paths, seq_len=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="different shards"):
        TokenLoader(paths[:1], seq_len=2, seed=1).load_state_dict(state)
    loader = TokenLoader(paths, seq_len=4)
    with pytest.raises(ValueError, match="multiple of seq_len=4"):
        loader.next_batch(6)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(paths, seq_len=4, rank=2, world_size=2)
    with pytest.raises(ShardError, match="does not exist"):
        TokenLoader([tmp_path / "missing.bin"], seq_len=4)


def test_loader_checks_vocab(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.bin", [1, 2, 3, 700, 4, 5])
    loader = TokenLoader([tmp_path / "s.bin"], seq_len=2, vocab_size=512)
    with pytest.raises(ShardError, match=r"s.bin: token id 700 >= vocab_size 512"):
        loader.next_batch(4)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=4).filter(lambda ls: sum(ls) > 0),
    seq_len=st.integers(1, 5),
    batch=st.integers(1, 3),
    world=st.integers(1, 3),
    steps=st.integers(1, 4),
)
def test_loader_ranks_tile_the_stream(lengths, seq_len, batch, world, steps) -> None:
    with tempfile.TemporaryDirectory() as d:
        paths, stream = _make_stream(Path(d), lengths)
        local = batch * seq_len
        loaders = [TokenLoader(paths, seq_len, rank=r, world_size=world) for r in range(world)]
        got = _stream_of([ld.next_batch(local) for _ in range(steps) for ld in loaders])
    n = steps * world * local + 1
    np.testing.assert_array_equal(got, np.tile(stream, n // len(stream) + 1)[:n])
