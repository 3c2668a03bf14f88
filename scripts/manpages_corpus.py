"""A second real text corpus: the Linux man-pages of Debian's ``manpages`` package, as plain text.

Downloads the package from the Debian archive (or takes a local .deb), checks its sha256, unpacks
it with the standard library (a .deb is an ``ar`` archive holding ``data.tar.xz``), renders every
page under ``usr/share/man`` to plain UTF-8 text with groff (``groff -man -Tutf8 -P-cbou``: no
bold/underline overstrikes), and writes one ``{"text": ...}`` JSON line per page, in sorted path
order. Then build the dataset with loopgolf::

    python scripts/manpages_corpus.py --out /tmp/manpages.jsonl
    loopgolf data build --input /tmp/manpages.jsonl --out /tmp/manpages-sp1024 --vocab-size 1024 --seed 1

manpages 6.9.1-1 (Debian 13 "trixie"): 323 pages (symbolic-link aliases skipped), 2,734,508
bytes of text, mostly sections 5 (file formats, 141 pages) and 7 (overviews, 120); system calls
and library functions are in ``manpages-dev``, not used. The pages carry their own licences, all
free: the Linux man-pages copyleft licences, GPL-1+/2/2+/3, BSD-style and Expat (see
``usr/share/doc/manpages/copyright`` in the package).

Needs ``groff`` on PATH (Debian/Ubuntu: ``apt install groff-base``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

URL = "https://deb.debian.org/debian/pool/main/m/manpages/manpages_6.9.1-1_all.deb"
SHA256 = "91b7df0b4bd4e1a3b8ba5b229abd844e03f4c82c45ccb8c964a035190c29a501"  # of URL, checked


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        out[name] = data[pos : pos + size]
        pos += size + (size & 1)  # members are 2-byte aligned
    return out


def render(page: bytes) -> str:
    roff = gzip.decompress(page)
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=roff, capture_output=True, check=True)
    return proc.stdout.decode("utf-8", errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb", type=Path, help="a downloaded manpages .deb (default: download it)")
    ap.add_argument("--out", type=Path, required=True, help="output .jsonl")
    ap.add_argument("--sha256", default=SHA256, help="expected sha256 of the .deb")
    args = ap.parse_args()
    deb = args.deb.read_bytes() if args.deb else urllib.request.urlopen(URL, timeout=60).read()
    digest = hashlib.sha256(deb).hexdigest()
    if args.sha256 and digest != args.sha256:
        sys.exit(f"sha256 mismatch: got {digest}, expected {args.sha256}")
    members = ar_members(deb)
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        sys.exit(f"no data.tar.* in the .deb (members: {', '.join(members)})")
    pages = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and "/usr/share/man/man" in "/" + m.name.lstrip("./") and m.name.endswith(".gz"):
                pages.append((m.name, tar.extractfile(m).read()))
    n_bytes = 0
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for name, page in pages:
            text = render(page)
            if text.strip():
                f.write(json.dumps({"text": text, "source": name.lstrip("./")}) + "\n")
                n_bytes += len(text.encode("utf-8"))
    tmp.replace(args.out)
    print(f"{args.out}: {len(pages)} pages, {n_bytes:,} bytes of UTF-8 text; .deb sha256 {digest}")


if __name__ == "__main__":
    main()
