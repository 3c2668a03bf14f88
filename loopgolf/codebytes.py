"""What a run counts as its code, as the one-file ``train_gpt.py`` it generates.

Parameter Golf counts the bytes of the script that trains, exports and scores (its whole
``train_gpt.py``) plus the compressed model. loopgolf's script is generated, never written by
hand: the import closure of :data:`SCRIPT_ENTRY_POINTS` (the run orchestration with training, the
encoders it imports inside functions for export, scoring, and :mod:`loopgolf.submit.entry`,
which reads the official environment variables), computed in a fresh interpreter
(:func:`package_modules`), with each module's source embedded verbatim as a string and imported
from the file by a small meta-path importer that shadows any installed loopgolf. The run's
configuration is baked in as JSON. What a run reports as ``code_bytes`` is the UTF-8 size of that
script for its configuration (:func:`code_counts`), so the number ``loopgolf run`` prints is the
number the submission has; ``loopgolf budget`` and ``loopgolf submission`` count the same way.

Not counted, as they are not in the script: the command line (``loopgolf.cli``,
``loopgolf.commands``), dataset preparation (``data build``, ``data fineweb``, the embedded
corpus: the official count leaves out its download script too), the xz reference baseline, this
module, and third-party libraries (torch, numpy, sentencepiece, zstandard), as the official count
does not count PyTorch. :func:`code_bytes_scoring` counts the scoring path alone (what
``loopgolf eval`` loads), for information.

Forms (:data:`FORMS`): ``plain`` (readable; the sources as they are), ``minify`` (each module
through python-minifier, docstrings dropped, names kept), and either of those wrapped by
:func:`compress_script` in a two-line self-extracting stub (lzma or brotli, base85).

The baked configuration leaves out what is not the model's recipe: the seed (the ``SEED``
variable, default 1337 as in the official script), the device, the data location, checkpointing
and uptraining (a records script trains from scratch). :data:`CODE_ID` ties a run to its code: the
sha256 of the embedded sources and baked configuration, the same for every form.
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

import loopgolf
from loopgolf.config import RunConfig, split_code_form

# What `loopgolf run` executes: the run module (which imports training, export and scoring) and
# the modules it imports inside functions for export. Listed explicitly so that moving an import
# into a function cannot make its bytes disappear from the count.
RUN_ENTRY_POINTS = ("loopgolf.run", "loopgolf.export.quantize", "loopgolf.export.gptq")
# What `loopgolf eval` executes: rebuild a model from an artifact, open a dataset, score it.
SCORING_ENTRY_POINTS = ("loopgolf.export.pack", "loopgolf.evaluate", "loopgolf.data.dataset", "loopgolf.device")


def package_modules(*entry_point_sets: tuple[str, ...]) -> list[list[str]]:
    """The loopgolf modules that importing each set of entry points loads, computed in one fresh
    interpreter so that whatever this process already imported does not leak in. The sets are
    imported in turn and list ``i`` is what is loaded after sets ``0..i``: the import closure of
    their union, which includes the earlier lists."""
    import json
    import subprocess
    import sys

    code = (
        "import importlib, json, sys\n"
        "loaded = []\n"
        f"for names in {[list(s) for s in entry_point_sets]!r}:\n"
        "    for m in names: importlib.import_module(m)\n"
        "    loaded.append(sorted(n for n in sys.modules if n == 'loopgolf' or n.startswith('loopgolf.')))\n"
        "print(json.dumps(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def scoring_modules() -> list[str]:
    """The loopgolf modules ``loopgolf eval`` needs (rebuild a model, open a dataset, score)."""
    return package_modules(SCORING_ENTRY_POINTS)[0]


def module_file(name: str) -> Path:
    spec = importlib_util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot locate the source of module {name}")
    return Path(spec.origin)


def source_bytes(modules: list[str]) -> int:
    """UTF-8 bytes of the named modules' source files."""
    return sum(len(module_file(n).read_bytes()) for n in modules)


def code_bytes_scoring() -> int:
    """Source bytes of the scoring path alone (``loopgolf eval``), for information."""
    return source_bytes(scoring_modules())


SCRIPT_ENTRY = "loopgolf.submit.entry"
SCRIPT_ENTRY_POINTS = RUN_ENTRY_POINTS + (SCRIPT_ENTRY,)
FORMS = ("plain", "minify")
COMPRESSORS = ("lzma", "brotli")
# The parts of a RunConfig that the script bakes in; the rest (data location, checkpointing,
# uptraining) belong to one machine or one run, not to the recipe.
BAKED_KEYS = ("preset", "model", "train", "export", "eval")
UNBAKED_TRAIN_KEYS = ("seed", "device")  # SEED and DEVICE in the environment
_RAW_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def script_config(config: RunConfig) -> dict[str, Any]:
    """The part of a run's configuration that a script bakes in (see the module docstring)."""
    full = config.to_dict()
    baked = {k: full[k] for k in BAKED_KEYS}
    baked["train"] = {k: v for k, v in full["train"].items() if k not in UNBAKED_TRAIN_KEYS}
    return baked


def _with_code_form(baked: dict[str, Any], code_form: str) -> dict[str, Any]:
    """``baked`` saying ``code_form``: a script states its own form, so the run it makes reports it."""
    return {**baked, "export": {**baked["export"], "code_form": code_form}}


def script_entry_points(config: RunConfig) -> tuple[str, ...]:
    """:data:`SCRIPT_ENTRY_POINTS`, and test-time training (imported by the run only when its
    configuration asks for it) when ``config`` does: a script carries only the code it runs."""
    return SCRIPT_ENTRY_POINTS + (("loopgolf.ttt",) if config.eval.ttt is not None else ())


def script_modules(config: RunConfig) -> list[str]:
    """The loopgolf modules a script for ``config`` embeds: the import closure of its entry points."""
    return package_modules(script_entry_points(config))[0]


def module_sources(modules: list[str]) -> dict[str, tuple[bool, str]]:
    """``name -> (is_package, source)`` read from this installation's files."""
    out = {}
    for name in modules:
        path = module_file(name)
        out[name] = (path.name == "__init__.py", path.read_text(encoding="utf-8"))
    return out


def code_id(sources: dict[str, tuple[bool, str]], baked: dict[str, Any]) -> str:
    """sha256 of the embedded sources and the baked configuration, as the script stores it, but
    for the script's own form (packaging, not recipe): every form of one run has one code id."""
    recipe = _with_code_form(baked, "plain") if "export" in baked else baked
    blob = json.dumps({"modules": sources, "config": recipe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _literal(text: str) -> str:
    """``text`` as a triple-quoted Python string literal that reads back as exactly ``text`` and
    stays readable (only backslashes, carriage returns and quote runs are escaped)."""
    body = text.replace("\\", "\\\\").replace("\r", "\\r").replace("'''", "\\'\\'\\'")
    if body.endswith("'"):
        body = body[:-1] + "\\'"
    return "'''" + body + "'''"


def require_minifier():
    """The python_minifier module; ValueError naming the extra that installs it."""
    try:
        import python_minifier
    except ImportError:
        raise ValueError("a minified script (--minify, --code-form minify...) needs python-minifier: pip install 'loopgolf[submit]'") from None
    return python_minifier


def _minify(source: str, name: str) -> str:
    python_minifier = require_minifier()
    # Names stay (other modules import them); docstrings go; class-level annotations stay because
    # dataclasses and loopgolf's config type checks read them.
    return python_minifier.minify(source, filename=name, remove_literal_statements=True, rename_globals=False)


_IMPORTER = '''
class _Bundle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports loopgolf from MODULES, ahead of (and instead of) any installed loopgolf."""

    def find_spec(self, name, path=None, target=None):
        if name not in MODULES:
            if name.startswith("loopgolf."):
                raise ModuleNotFoundError(f"{name} is not part of this script", name=name)
            return None
        return importlib.util.spec_from_loader(name, self, origin=__file__, is_package=MODULES[name][0])

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        source = MODULES[module.__name__][1]
        filename = f"{__file__}/{module.__name__}"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show lines
        exec(compile(source, filename, "exec"), module.__dict__)


if __name__ == "__main__":
    sys.meta_path.insert(0, _Bundle())
    from loopgolf.submit.entry import main

    sys.exit(main(CONFIG, code_path=__file__, code_id=CODE_ID))
'''


def _header(baked: dict[str, Any], tag: str, n_modules: int) -> str:
    vocab = baked["model"]["vocab_size"]
    return f'''"""Parameter Golf training script generated by {tag}.

Trains, exports and scores loopgolf preset {baked["preset"]!r} with the configuration in CONFIG:
quantization {baked["export"]["quant"] or "int8"}, codec {baked["export"]["codec"]}. The {n_modules} loopgolf modules it runs are
embedded below and imported from this file; it needs Python, torch, numpy, sentencepiece and the
codec libraries (zstandard, brotli) only.

    SEED=1337 torchrun --standalone --nproc_per_node=8 train_gpt.py

Environment: DATA_PATH (default ./data/datasets/fineweb10B_sp{vocab}), TOKENIZER_PATH (default: found
from DATA_PATH, as data/tokenizers/fineweb_{vocab}_bpe.model in the official layout), SEED, RUN_ID,
OUT_DIR (default runs/RUN_ID), DEVICE, MAX_WALLCLOCK_SECONDS (0: no time limit), ITERATIONS, and
the official names of the other settings (see loopgolf.submit.entry.OFFICIAL_ENV), or
LOOPGOLF_OVERRIDES='{{"train": {{...}}, "model": {{...}}}}' for any loopgolf field.
"""
'''


@dataclass(frozen=True)
class Bundle:
    """What a script embeds: the baked configuration and the module sources, and their code id."""

    baked: dict[str, Any]
    sources: dict[str, tuple[bool, str]]
    code_id: str

    @classmethod
    def of(cls, config: RunConfig, modules: list[str] | None = None) -> Bundle:
        """The bundle for a run's configuration, from this installation's files."""
        baked = script_config(config)
        sources = module_sources(modules if modules is not None else script_modules(config))
        return cls(baked, sources, code_id(sources, baked))

    def render(self, form: str = "plain", compress: str | None = None) -> str:
        """The ``train_gpt.py`` text in one of :data:`FORMS`, optionally self-extracting."""
        if form not in FORMS:
            raise ValueError(f"unknown script form {form!r}; valid: {', '.join(FORMS)}")
        if compress is not None and compress not in COMPRESSORS:
            raise ValueError(f"unknown compressor {compress!r}; valid: {', '.join(COMPRESSORS)}")
        plain = form == "plain"
        sources = self.sources if plain else {n: (pkg, _minify(src, n)) for n, (pkg, src) in self.sources.items()}
        tag = f"loopgolf {loopgolf.__version__} (code id {self.code_id[:16]})"
        baked = _with_code_form(self.baked, form + (f"+{compress}" if compress else ""))
        parts = [
            _header(baked, tag, len(sources)) if plain else f"# Parameter Golf script generated by {tag}; run under torchrun.\n",
            "import importlib.abc, importlib.util, json, linecache, sys\n\n",
            f"CODE_ID = {self.code_id!r}\n",
            f"CONFIG = json.loads({_literal(json.dumps(baked, indent=1 if plain else None, sort_keys=True))})\n",
            "MODULES = {}  # name -> (is_package, source)\n" if plain else "MODULES = {}\n",
        ]
        parts += [f"MODULES[{name!r}] = ({pkg}, {_literal(src)})\n" for name, (pkg, src) in sources.items()]
        parts.append(_IMPORTER if plain else _minify(_IMPORTER, "importer"))
        text = "".join(parts)
        return compress_script(text, compress) if compress else text


def render_script(config: RunConfig, *, form: str = "plain", compress: str | None = None) -> str:
    """The ``train_gpt.py`` text for a run's configuration."""
    return Bundle.of(config).render(form, compress)


def compress_script(text: str, codec: str = "lzma") -> str:
    """A two-line script that inflates and runs ``text``: raw LZMA2 (standard library) or brotli,
    base85-encoded (no quote or backslash in its alphabet, so one plain string literal)."""
    data = text.encode("utf-8")
    if codec == "lzma":
        packed = lzma.compress(data, format=lzma.FORMAT_RAW, filters=_RAW_LZMA)
        inflate = "import lzma as L,base64 as B\nexec(L.decompress(B.b85decode('{}'),L.FORMAT_RAW,None,[{{'id':L.FILTER_LZMA2}}]))\n"
    elif codec == "brotli":
        import brotli

        packed = brotli.compress(data, quality=11, lgwin=24)
        inflate = "import brotli as L,base64 as B\nexec(L.decompress(B.b85decode('{}')))\n"
    else:
        raise ValueError(f"unknown compressor {codec!r}; valid: {', '.join(COMPRESSORS)}")
    return inflate.format(base64.b85encode(packed).decode("ascii"))


@dataclass(frozen=True)
class CodeCount:
    """What a run reports about its code: the bytes of its script in the configured form
    (``export.code_form``), the code id, and the scoring path's source bytes (what
    ``loopgolf eval`` loads), for information."""

    code_bytes: int
    code_id: str
    code_bytes_scoring: int | None
    code_form: str = "plain"


def code_counts(config: RunConfig) -> CodeCount:
    """The code a run with ``config`` counts: its ``train_gpt.py`` in ``config.export.code_form``.
    One fresh interpreter gives both the script's closure and the scoring path's (importing the
    scoring entry points first leaves the union, the script's closure, unchanged)."""
    scoring, script = package_modules(SCORING_ENTRY_POINTS, script_entry_points(config))
    bundle = Bundle.of(config, modules=script)
    form, compress = split_code_form(config.export.code_form)
    return CodeCount(len(bundle.render(form, compress).encode("utf-8")), bundle.code_id, source_bytes(scoring), config.export.code_form)
