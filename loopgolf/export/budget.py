"""Byte accounting against the artifact cap.

``code_bytes`` is defined as the UTF-8 bytes of the loopgolf source files a scorer needs to
rebuild and evaluate a model from its artifact: ``loopgolf.export.pack`` (artifact reading,
dequantization, the model and its plan) plus ``loopgolf.evaluate`` (the official val_bpb and its
tokenizer byte tables, shard reading), and the package ``__init__`` files on the way. A test runs
those imports in a fresh interpreter and checks that this list is exactly what gets loaded, so
the number cannot silently drift from the code. Third-party libraries (torch, numpy,
sentencepiece, zstandard) are not counted, as the official count does not count PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import util as importlib_util
from pathlib import Path

DEFAULT_CAP_BYTES = 16_000_000

# Entry points of the scoring path; SCORING_MODULES is their closure inside loopgolf.
SCORING_ENTRY_POINTS = ("loopgolf.export.pack", "loopgolf.evaluate")


def scoring_modules() -> list[str]:
    """The loopgolf modules imported by the scoring entry points (computed in a fresh
    interpreter so that whatever this process already imported does not leak in)."""
    import json
    import subprocess
    import sys

    code = (
        "import importlib, json, sys\n"
        f"for m in {list(SCORING_ENTRY_POINTS)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(n for n in sys.modules if n == 'loopgolf' or n.startswith('loopgolf.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def module_file(name: str) -> Path:
    spec = importlib_util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot locate the source of module {name}")
    return Path(spec.origin)


def code_bytes(modules: list[str] | None = None) -> int:
    """UTF-8 bytes of the scoring path's source files."""
    names = scoring_modules() if modules is None else modules
    return sum(len(module_file(n).read_text(encoding="utf-8").encode("utf-8")) for n in names)


@dataclass
class CapReport:
    model_bytes: int
    code_bytes: int
    cap_bytes: int

    @property
    def artifact_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def headroom(self) -> int:
        """Bytes left under the cap (negative when over)."""
        return self.cap_bytes - self.artifact_bytes

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def describe(self) -> str:
        verdict = f"fits with {self.headroom:,} bytes to spare" if self.fits else f"OVER the cap by {-self.headroom:,} bytes"
        return (
            f"{self.model_bytes:,} model + {self.code_bytes:,} code = {self.artifact_bytes:,} bytes "
            f"of {self.cap_bytes:,}: {verdict}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "artifact_bytes": self.artifact_bytes, "headroom_bytes": self.headroom, "fits": self.fits}
