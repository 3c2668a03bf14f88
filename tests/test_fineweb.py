"""Downloading the official FineWeb export (loopgolf.data.fineweb) from a local stand-in of the HF repo."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from loopgolf.data import fineweb
from loopgolf.data.fineweb import HF_REPO, DownloadError, download_fineweb, hf_url
from loopgolf.data.shards import BOS_ID, write_shard
from loopgolf.data.tokenizer import load_tokenizer

OFFICIAL_TOKENIZERS = Path(__file__).resolve().parent / "assets" / "tokenizers"  # vendored, see assets/README.md
SHARD_SIZE = 1000  # tokens per shard in the stand-in export (the real one uses 1e8)
TOKENS = {"val": 1300, "train": 2500}  # -> val shards of 1000 + 300, train 1000 + 1000 + 500


class StandIn:
    """A folder laid out like huggingface.co/datasets/<repo>/resolve/main/datasets/..."""

    def __init__(self, hub: Path, tokenizer: Path, vocab_size: int) -> None:
        self.hub = hub
        self.root = hub / "datasets" / HF_REPO / "resolve" / "main" / fineweb.REMOTE_ROOT
        self.vocab_size = vocab_size
        ds = self.root / "datasets" / "fineweb10B_sp1024"
        rng = np.random.default_rng(0)
        for split, total in TOKENS.items():
            for i, start in enumerate(range(0, total, SHARD_SIZE)):
                n = min(SHARD_SIZE, total - start)
                tokens = rng.integers(4, vocab_size, size=n)
                tokens[::97] = BOS_ID
                write_shard(ds / f"fineweb_{split}_{i:06d}.bin", tokens, vocab_size=vocab_size)
        (self.root / "tokenizers").mkdir(parents=True)
        shutil.copyfile(tokenizer, self.root / "tokenizers" / "fineweb_1024_bpe.model")
        shutil.copyfile(tokenizer.with_suffix(".vocab"), self.root / "tokenizers" / "fineweb_1024_bpe.vocab")
        self.manifest = self._official_manifest()
        self.write_manifest()

    def _official_manifest(self) -> dict:
        # Field names as written by the official export script (data/download_hf_docs_and_tokenize.py).
        stats = {
            "docs_total": 60,
            "docs_val": 20,
            "docs_train": 40,
            "files_total": 5,
            "files_val": 2,
            "files_train": 3,
            "tokens_total": sum(TOKENS.values()),
            "tokens_val": TOKENS["val"],
            "tokens_train": TOKENS["train"],
        }
        return {
            "version": "10B",
            "num_docs": 60,
            "num_val_docs": 20,
            "shuffle_seed": 1337,
            "shard_size": SHARD_SIZE,
            "append_eos": False,
            "docs_jsonl": "docs_selected.jsonl",
            "tokenizers": [
                {
                    "name": "sp_bpe_1024",
                    "kind": "sentencepiece_bpe",
                    "vocab_size": self.vocab_size,
                    "bos_id": 1,
                    "eos_id": 2,
                    "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
                }
            ],
            "datasets": [
                {
                    "name": "fineweb10B_sp1024",
                    "tokenizer_name": "sp_bpe_1024",
                    "tokenizer_kind": "sentencepiece_bpe",
                    "path": "datasets/fineweb10B_sp1024",
                    "train_glob": "datasets/fineweb10B_sp1024/fineweb_train_*.bin",
                    "val_glob": "datasets/fineweb10B_sp1024/fineweb_val_*.bin",
                    "vocab_size": self.vocab_size,
                    "bos_id": 1,
                    "eos_id": 2,
                    "stats": stats,
                }
            ],
        }

    def write_manifest(self) -> None:
        (self.root / "manifest.json").write_text(json.dumps(self.manifest, indent=2))

    def file(self, rel: str) -> Path:
        return self.root / rel


@pytest.fixture(scope="module")
def tokenizer() -> tuple[Path, int]:
    return OFFICIAL_TOKENIZERS / "fineweb_1024_bpe.model", 1024


@pytest.fixture
def standin(tmp_path, tokenizer) -> StandIn:
    return StandIn(tmp_path / "hub", *tokenizer)


@pytest.fixture
def server(standin):
    """An HTTP server for the stand-in that honours Range requests and logs what it was asked."""
    log: list[tuple[str, str | None, int]] = []  # (path, Range header, body bytes sent)
    cut: dict[str, int] = {}  # path -> send only this many bytes once, then drop the connection

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            path = standin.hub / self.path.lstrip("/")
            # Every log entry is made before the response goes out: the client may return (and the
            # test read the log) as soon as the last byte arrives, before this thread runs on.
            if not path.is_file():
                log.append((self.path, self.headers.get("Range"), 0))
                self.send_error(404)
                return
            data = path.read_bytes()
            rng = self.headers.get("Range")
            start = 0
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-", rng)
                start = int(m.group(1))
                if start >= len(data):
                    log.append((self.path, rng, 0))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            header_length = len(body)
            if self.path in cut:
                body = body[: cut.pop(self.path)]
                self.close_connection = True
            log.append((self.path, rng, len(body)))
            self.send_header("Content-Length", str(header_length))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield endpoint, log, cut
    httpd.shutdown()
    httpd.server_close()


def _url_path(endpoint: str, rel: str) -> str:
    return hf_url(endpoint, rel).removeprefix(endpoint)


VAL1 = "datasets/fineweb10B_sp1024/fineweb_val_000001.bin"
TRAIN0 = "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"


def test_download_official_layout(tmp_path, standin, server):
    endpoint, log, _ = server
    out = tmp_path / "data"
    ds = download_fineweb(out, "sp1024", train_shards=2, endpoint=endpoint, progress=False)
    assert ds == out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
    ]
    for p in ds.iterdir():
        assert p.read_bytes() == standin.file(f"datasets/fineweb10B_sp1024/{p.name}").read_bytes()
    for name in ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"):
        assert (out / "tokenizers" / name).read_bytes() == standin.file(f"tokenizers/{name}").read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == standin.manifest
    assert not list(out.rglob("*.part"))

    n_requests = len(log)
    assert download_fineweb(out, "sp1024", train_shards=2, endpoint=endpoint, progress=False) == ds
    assert len(log) == n_requests  # everything present with the right size: no network at all
    download_fineweb(out, "sp1024", train_shards=3, endpoint=endpoint, progress=False)
    assert [entry[0] for entry in log[n_requests:]] == [_url_path(endpoint, "datasets/fineweb10B_sp1024/fineweb_train_000002.bin")]


def test_resume_continues_partial_file(tmp_path, standin, server):
    endpoint, log, _ = server
    out = tmp_path / "data"
    dest = out / TRAIN0
    dest.parent.mkdir(parents=True)
    full = standin.file(TRAIN0).read_bytes()
    Path(str(dest) + ".part").write_bytes(full[:700])
    download_fineweb(out, "sp1024", train_shards=1, endpoint=endpoint, progress=False)
    assert dest.read_bytes() == full
    asked = [e for e in log if e[0] == _url_path(endpoint, TRAIN0)]
    assert asked == [(_url_path(endpoint, TRAIN0), "bytes=700-", len(full) - 700)]


def test_dropped_connection_keeps_part_and_resumes(tmp_path, standin, server):
    endpoint, log, cut = server
    out = tmp_path / "data"
    path = _url_path(endpoint, TRAIN0)
    cut[path] = 1500
    with pytest.raises(DownloadError, match=re.escape(hf_url(endpoint, TRAIN0)) + ".*1500 of"):
        download_fineweb(out, "sp1024", train_shards=1, endpoint=endpoint, progress=False)
    part = Path(str(out / TRAIN0) + ".part")
    assert part.stat().st_size == 1500 and not (out / TRAIN0).exists()
    download_fineweb(out, "sp1024", train_shards=1, endpoint=endpoint, progress=False)
    assert (out / TRAIN0).read_bytes() == standin.file(TRAIN0).read_bytes() and not part.exists()
    assert [e[1] for e in log if e[0] == path] == [None, "bytes=1500-"]


def test_size_mismatch_deletes_part(tmp_path, standin, server):
    endpoint, _, _ = server
    write_shard(standin.file(VAL1), np.full(400, 5), vocab_size=standin.vocab_size)  # manifest implies 300
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"size mismatch.*fineweb_val_000001\.bin"):
        download_fineweb(out, "sp1024", endpoint=endpoint, progress=False)
    assert not (out / VAL1).exists() and not Path(str(out / VAL1) + ".part").exists()
    assert (out / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin").is_file()  # good files stay


def test_bad_shard_header_rejected(tmp_path, standin, server):
    endpoint, _, _ = server
    data = bytearray(standin.file(VAL1).read_bytes())
    data[0] ^= 0xFF  # wrong magic, right size
    standin.file(VAL1).write_bytes(bytes(data))
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match="magic"):
        download_fineweb(out, "sp1024", endpoint=endpoint, progress=False)
    assert not (out / VAL1).exists() and not Path(str(out / VAL1) + ".part").exists()


def test_sha256_listed_in_manifest_is_checked(tmp_path, standin, server):
    endpoint, _, _ = server
    entry = standin.manifest["datasets"][0]
    good = hashlib.sha256(standin.file(VAL1).read_bytes()).hexdigest()
    entry["files"] = [{"name": "fineweb_val_000001.bin", "bytes": standin.file(VAL1).stat().st_size, "sha256": "0" * 64}]
    standin.write_manifest()
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_fineweb(out, "sp1024", endpoint=endpoint, progress=False)
    assert not (out / VAL1).exists()
    entry["files"][0]["sha256"] = good
    standin.write_manifest()
    (out / "manifest.json").unlink()  # local manifest copy is trusted as is; fetch the new one
    download_fineweb(out, "sp1024", endpoint=endpoint, progress=False)
    assert (out / VAL1).is_file()


def test_request_errors(tmp_path, standin, server):
    endpoint, log, _ = server
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match="unknown variant 'gpt2'"):
        download_fineweb(out, "gpt2", endpoint=endpoint, progress=False)
    assert log == []  # rejected before any network use
    with pytest.raises(DownloadError, match=r"unknown variant 'sp8192'.*sp1024"):
        download_fineweb(out, "sp8192", endpoint=endpoint, progress=False)
    with pytest.raises(DownloadError, match="only 3 training shards.*requested 4"):
        download_fineweb(out, "sp1024", train_shards=4, endpoint=endpoint, progress=False)
    with pytest.raises(DownloadError, match="non-negative"):
        download_fineweb(out, "sp1024", train_shards=-1, endpoint=endpoint, progress=False)
    standin.file(TRAIN0).unlink()
    with pytest.raises(DownloadError, match=r"fineweb_train_000000\.bin: HTTP 404"):
        download_fineweb(out, "sp1024", train_shards=1, endpoint=endpoint, progress=False)


def test_network_error_names_url(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(DownloadError, match=re.escape(hf_url(endpoint, "manifest.json"))):
        download_fineweb(tmp_path / "data", "sp1024", endpoint=endpoint, progress=False)
    assert not list((tmp_path / "data").rglob("*.part"))


def test_file_endpoint_from_environment(tmp_path, standin, monkeypatch):
    monkeypatch.setenv("LOOPGOLF_HF_ENDPOINT", standin.hub.as_uri())
    ds = download_fineweb(tmp_path / "data", "sp1024", train_shards=1, progress=False)
    assert (ds / "fineweb_val_000001.bin").read_bytes() == standin.file(VAL1).read_bytes()
    sp = load_tokenizer(tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model")
    assert sp.get_piece_size() == standin.vocab_size


def test_tokenizer_vocab_must_match_manifest(tmp_path, standin, server):
    endpoint, _, _ = server
    for key in ("datasets", "tokenizers"):
        standin.manifest[key][0]["vocab_size"] = 2048
    standin.write_manifest()
    with pytest.raises(DownloadError, match="vocab_size 2048"):
        download_fineweb(tmp_path / "data", "sp1024", endpoint=endpoint, progress=False)
