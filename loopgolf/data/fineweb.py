"""Download the official cached FineWeb shards of the Parameter Golf challenge.

Remote layout (Hugging Face dataset repo `willdepueoai/parameter-golf`, export root `datasets/`),
as the official downloader `data/cached_challenge_fineweb.py` in openai/parameter-golf reads it:

    datasets/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin, fineweb_train_000000.bin, ...
    datasets/tokenizers/fineweb_1024_bpe.model, fineweb_1024_bpe.vocab

The manifest (written by the official export script) holds, among others,
    "shard_size": 100000000,
    "datasets":   [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "vocab_size": 1024,
                    "stats": {"files_train", "files_val", "tokens_train", "tokens_val", ...}, ...}],
    "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab", ...}]
with artifact paths relative to the export root. It lists no per-file sizes; since the exporter
fills every shard to `shard_size` tokens before starting the next, each shard's size follows from
the token counts, and we check it. A dataset entry may also carry "files": [{"name", "bytes",
"sha256"}] (not in the official manifest); those are then checked too.

Local layout (the official one): OUT/manifest.json, OUT/datasets/fineweb10B_<variant>/*.bin,
OUT/tokenizers/*. Downloads are resumable: bytes go to NAME.part, continued with an HTTP Range
request, and renamed only when complete and verified.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from loopgolf import __version__
from loopgolf.data.shards import HEADER_BYTES, read_shard_header
from loopgolf.data.tokenizer import TokenizerError, load_tokenizer

HF_REPO = "willdepueoai/parameter-golf"
HF_REVISION = "main"
REMOTE_ROOT = "datasets"  # the export's folder inside the dataset repo
DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "LOOPGOLF_HF_ENDPOINT"
MANIFEST_NAME = "manifest.json"
_VARIANT_RE = re.compile(r"^(sp\d+|byte260)$")
_CHUNK = 1 << 20
_TIMEOUT = 60.0


class DownloadError(ValueError):
    """A download could not be done: bad request (variant, shard count), network, or bad file."""


@dataclass(frozen=True)
class RemoteFile:
    remote: str  # path relative to the export root, e.g. "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    size: int | None  # expected bytes, when the manifest determines it
    sha256: str | None = None
    is_shard: bool = False


def hf_url(endpoint: str, remote: str, repo: str = HF_REPO, revision: str = HF_REVISION) -> str:
    """The resolve URL of `remote` (relative to the export root) in the dataset repo."""
    path = f"datasets/{repo}/resolve/{revision}/{REMOTE_ROOT}/{remote}"
    return f"{endpoint.rstrip('/')}/{urllib.parse.quote(path)}"


def _open(url: str, offset: int = 0):
    headers = {"User-Agent": f"loopgolf/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    # urllib keeps the Range header across redirects (HF redirects large files to its CDN).
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT)


def _network_error(url: str, e: Exception) -> DownloadError:
    if isinstance(e, urllib.error.HTTPError):
        return DownloadError(f"download failed: {url}: HTTP {e.code} {e.reason}")
    reason = getattr(e, "reason", None) or e
    return DownloadError(f"download failed: {url}: {reason}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _response_total(resp, offset: int) -> tuple[int, int | None]:
    """(start offset of the body, total file size or None) from the response headers.

    A server that ignores Range answers 200 with the whole file: the body then starts at 0.
    """
    status = getattr(resp, "status", None)
    if status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m:
            raise DownloadError(f"{resp.url}: 206 answer without a usable Content-Range header")
        total = None if m.group(2) == "*" else int(m.group(2))
        return int(m.group(1)), total
    length = resp.headers.get("Content-Length")
    return 0, (int(length) if length is not None else None)


def _fetch(
    url: str,
    dest: Path,
    size: int | None,
    sha256: str | None,
    progress: bool,
    check: Callable[[Path], object] | None = None,
) -> None:
    """Download `url` to `dest` through `dest.part`, resuming a partial .part; verify, then rename.

    `check(part)` may raise ValueError for content that is complete but wrong (e.g. a bad header).
    """
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()  # longer than the file can be: not a prefix of it
        offset = 0
    if size is None or offset < size:
        try:
            try:
                resp = _open(url, offset)
            except urllib.error.HTTPError as e:
                if e.code != 416 or not offset:
                    raise
                part.unlink()  # the server says our partial file is not a prefix: start over
                offset = 0
                resp = _open(url, 0)
            with resp:
                start, total = _response_total(resp, offset)
                if start not in (0, offset):
                    raise DownloadError(f"{url}: asked for bytes from {offset}, the server sent from {start}")
                offset = start  # 0 when the server ignored Range: rewrite from the beginning
                if size is not None and total is not None and total != size:
                    raise DownloadError(f"size mismatch: {url} is {total} bytes, the manifest implies {size}; the remote file or the manifest is wrong")
                with (
                    open(part, "r+b" if offset else "wb") as f,
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
                ):
                    f.seek(offset)
                    f.truncate()
                    received = 0
                    while block := resp.read(_CHUNK):
                        f.write(block)
                        received += len(block)
                        bar.update(len(block))
                length = resp.headers.get("Content-Length")
                if length is not None and received != int(length):
                    # http.client returns a short body without complaint when the peer hangs up.
                    raise ConnectionError(f"connection closed after {received} of {length} bytes; run again to resume")
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            # The .part keeps what arrived, so the next call continues from there.
            raise _network_error(url, e) from e
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"size mismatch: {url} gave {got} bytes, the manifest implies {size}; deleted {part}")
    if sha256 is not None:
        digest = _sha256(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(f"sha256 mismatch: {url} hashes to {digest}, the manifest says {sha256}; deleted {part}")
    if check is not None:
        try:
            check(part)
        except ValueError as e:
            part.unlink()
            raise DownloadError(f"{url}: downloaded file is not valid ({e}); deleted {part}") from e
    os.replace(part, dest)


def _load_remote_manifest(out_dir: Path, endpoint: str, progress: bool) -> dict:
    """The export's manifest; a local copy is used as is (the published export is frozen)."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        _fetch(hf_url(endpoint, MANIFEST_NAME), path, None, None, progress=False)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DownloadError(f"{path}: not valid JSON ({e}); delete it to fetch it again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DownloadError(f'{path}: not a challenge manifest (no "datasets" list); delete it to fetch it again')
    return manifest


def _safe_relative(path: str, where: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DownloadError(f"{where}: unsafe artifact path {path!r} in the manifest")
    return p.as_posix()


def _shard_plan(entry: dict, shard_size: int | None, split: str, count: int) -> list[RemoteFile]:
    """The first `count` shards of `split`, with sizes where the manifest determines them."""
    name = entry["name"]
    stats = entry.get("stats") or {}
    files = {f["name"]: f for f in entry.get("files") or [] if isinstance(f, dict) and "name" in f}
    n_files, n_tokens = stats.get(f"files_{split}"), stats.get(f"tokens_{split}")
    # Sizes follow from the counts only if the shards are full except the last one.
    derivable = shard_size and n_files is not None and n_tokens is not None and n_files == -(-n_tokens // shard_size)
    plan = []
    for i in range(count):
        fname = f"fineweb_{split}_{i:06d}.bin"
        size = HEADER_BYTES + 2 * min(shard_size, n_tokens - i * shard_size) if derivable else None
        listed = files.get(fname, {})
        size = listed.get("bytes", size)
        plan.append(RemoteFile(f"datasets/{name}/{fname}", size, listed.get("sha256"), is_shard=True))
    return plan


def download_fineweb(
    out_dir: str | os.PathLike,
    variant: str = "sp1024",
    train_shards: int = 1,
    *,
    endpoint: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch the manifest, every val shard, the first `train_shards` train shards and the tokenizer.

    Returns OUT/datasets/fineweb10B_<variant>. Files already present with the expected size are
    skipped; an interrupted download continues where it stopped on the next call.
    """
    out_dir = Path(out_dir)
    if not _VARIANT_RE.match(variant):
        raise DownloadError(f"unknown variant {variant!r}: expected sp<VOCAB> (e.g. sp1024, sp8192) or byte260")
    if train_shards < 0:
        raise DownloadError(f"train_shards must be non-negative, got {train_shards}")
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _load_remote_manifest(out_dir, endpoint, progress)

    dataset_name = f"fineweb10B_{variant}"
    entry = next((d for d in manifest["datasets"] if isinstance(d, dict) and d.get("name") == dataset_name), None)
    if entry is None:
        known = sorted(str(d.get("name", "")).removeprefix("fineweb10B_") for d in manifest["datasets"] if isinstance(d, dict))
        raise DownloadError(f"unknown variant {variant!r}: the manifest has {', '.join(known) or 'no datasets'}")
    stats = entry.get("stats") or {}
    try:
        max_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{out_dir / MANIFEST_NAME}: dataset {dataset_name} has no files_train/files_val stats") from None
    if train_shards > max_train:
        raise DownloadError(f"{variant} has only {max_train} training shards on {HF_REPO}, requested {train_shards}")
    tok_name = entry.get("tokenizer_name")
    tok_entry = next((t for t in manifest.get("tokenizers") or [] if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok_entry is None:
        raise DownloadError(f"{out_dir / MANIFEST_NAME}: tokenizer {tok_name!r} of {dataset_name} is not listed")
    tok_paths = [_safe_relative(str(tok_entry[k]), str(out_dir / MANIFEST_NAME)) for k in ("model_path", "vocab_path", "path") if tok_entry.get(k)]
    if not tok_paths:
        raise DownloadError(f"{out_dir / MANIFEST_NAME}: tokenizer {tok_name!r} lists no files")

    shard_size = manifest.get("shard_size")
    plan = [
        *_shard_plan(entry, shard_size, "val", n_val),
        *_shard_plan(entry, shard_size, "train", train_shards),
        *(RemoteFile(p, None) for p in tok_paths),
    ]
    for item in tqdm(plan, desc=f"fineweb {variant}", unit="file", disable=not progress):
        dest = out_dir.joinpath(*PurePosixPath(item.remote).parts)
        if dest.is_file() and (item.size is None or dest.stat().st_size == item.size):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.unlink()  # wrong size: a stale or damaged copy
        check = read_shard_header if item.is_shard else None
        _fetch(hf_url(endpoint, item.remote), dest, item.size, item.sha256, progress, check)

    model = next((p for p in tok_paths if p.endswith(".model")), None)
    if model is not None and entry.get("vocab_size") is not None:
        try:
            sp = load_tokenizer(out_dir / model)
        except TokenizerError as e:
            raise DownloadError(str(e)) from e
        if sp.get_piece_size() != int(entry["vocab_size"]):
            raise DownloadError(f"{out_dir / model} has {sp.get_piece_size()} pieces, the manifest says {dataset_name} has vocab_size {entry['vocab_size']}")
    return out_dir / "datasets" / dataset_name
