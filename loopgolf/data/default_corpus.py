"""The embedded default corpus: English documentation that every CPython installation carries.

So that `loopgolf` can train and score something right after `pip install`, offline, the default
dataset is built from text already on the machine:

1. the pydoc topics (`pydoc_data.topics.topics`, the language reference sections `help()` shows),
   one document per topic, in sorted topic order;
2. the docstrings of the standard library, read with `ast` from the source files (never imported:
   no side effects, same result on every run), one document per module: the module docstring,
   then every class, function and method docstring in source order, joined by blank lines.
   Skipped: site-packages, test/tests folders, idlelib, lib2to3, tkinter, turtledemo, and modules
   whose text is under 300 characters. Modules are sorted by dotted name.

Measured on CPython 3.11.7 (Linux): 79 topic documents (466,038 bytes) + 329 module documents
(1,492,969 bytes) = 408 documents, 1,959,007 bytes of UTF-8 text. Reading it takes about 2 s
(parsing ~560 source files); building the sp1024 dataset from it (tokenizer training, encoding,
xz baseline) about 0.5 s more: 388 train documents (677,078 tokens), 20 val documents (45,568
tokens), xz baseline 2.31 bits per byte. The build holds out the validation documents (seed 1337)
and shuffles the training documents (same seed) before sharding, so the train stream mixes topics
and modules from its first tokens on; validation keeps the order above.
Other Python versions give a somewhat different corpus, so the cache directory names the version.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from loopgolf.data.corpus import CorpusError, Document, build_dataset, load_manifest, verify_dataset
from loopgolf.util import cache_dir

DEFAULT_CORPUS_NAME = "python-docs"
DEFAULT_DATA_NAME = f"embedded:{DEFAULT_CORPUS_NAME}"  # what a run on it records as its data name
DEFAULT_CORPUS_FORMAT = 2  # bump when the corpus text or the build recipe changes: new cache dir (2: train shuffled)
DEFAULT_SEED = 1337
MIN_MODULE_CHARS = 300  # shorter module texts are mostly one-line stubs
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "__pycache__"})
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics  # plain data module, safe to import
    except ImportError:  # some distributions split it out; the stdlib docstrings still suffice
        return []
    return [Document(text=topics[name].strip(), source=f"pydoc_data.topics:{name}") for name in sorted(topics) if topics[name].strip()]


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings of the classes and functions (methods included) under `tree`, in source order."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.expr):
            continue  # definitions are statements; skipping expressions makes the walk 3x faster
        if isinstance(node, _DEFS):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                yield doc.strip()
        yield from _docstrings(node)


def _module_text(path: Path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources warn on parse
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None  # templates and broken files are not documentation
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc and module_doc.strip():
        parts.append(module_doc.strip())
    parts.extend(_docstrings(tree))
    return "\n\n".join(parts)


def _stdlib_modules(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        # config-3.x-<platform> holds build helpers, not library modules
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "."))]
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            parts = [*rel.parts, name[:-3]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:
                yield ".".join(parts), Path(dirpath) / name


def _module_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for module, path in sorted(_stdlib_modules(root)):
        text = _module_text(path)
        if text is not None and len(text) >= MIN_MODULE_CHARS:
            docs.append(Document(text=text, source=f"stdlib:{module}"))
    return docs


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[Document, ...]:
    docs = (*_topic_documents(), *_module_documents())
    if not docs:
        raise CorpusError(
            "the default corpus is empty: this Python has neither pydoc_data nor standard-library "
            f"sources under {sysconfig.get_paths()['stdlib']}; build a dataset from your own text"
        )
    return docs


def default_corpus_documents() -> list[Document]:
    """The default corpus: pydoc topics then stdlib module docstrings; the same on every call."""
    return list(_documents())


def default_corpus_description() -> str:
    docs = _documents()
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    topics = sum(d.source.startswith("pydoc_data") for d in docs)
    return (
        f"{DEFAULT_CORPUS_NAME}: the English documentation shipped with Python "
        f"{sys.version_info.major}.{sys.version_info.minor} ({topics} pydoc topics + "
        f"{len(docs) - topics} standard-library modules' docstrings), {len(docs)} documents, "
        f"{n_bytes:,} bytes of UTF-8 text"
    )


def _cache_root(cache_root: str | os.PathLike | None) -> Path:
    return Path(cache_root) if cache_root is not None else cache_dir()


def default_dataset_dir(vocab_size: int = 1024, cache_root: str | os.PathLike | None = None) -> Path:
    """Where the default dataset for `vocab_size` lives (built or not)."""
    v = sys.version_info
    name = f"{DEFAULT_CORPUS_NAME}-py{v.major}.{v.minor}-v{DEFAULT_CORPUS_FORMAT}-sp{vocab_size}"
    return _cache_root(cache_root) / "datasets" / name


def _is_valid(data_dir: Path, vocab_size: int) -> bool:
    try:
        manifest = load_manifest(data_dir)
        if manifest is None or manifest.get("vocab_size") != vocab_size:
            return False
        if "tokenizer_sha256" not in manifest:
            return False  # cached by a loopgolf that did not record it: rebuilt, so its tokenizer is checked
        verify_dataset(data_dir)
    except (CorpusError, KeyError, TypeError):
        return False
    return True


@contextlib.contextmanager
def _build_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock so that racing processes build once; the loser then reuses the result."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic directory replace still keeps data whole
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_default_dataset(vocab_size: int = 1024, cache_root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the default dataset's directory, building it first if absent or broken."""
    data_dir = default_dataset_dir(vocab_size, cache_root)
    if _is_valid(data_dir, vocab_size):
        return data_dir
    with _build_lock(data_dir.with_name(f".{data_dir.name}.lock")):
        if _is_valid(data_dir, vocab_size):  # another process built it while we waited
            return data_dir
        build_dataset(
            None,
            data_dir,
            documents=default_corpus_documents(),
            vocab_size=vocab_size,
            seed=DEFAULT_SEED,
            force=True,  # whatever is there failed verification
            progress=progress,
            source_names=[f"{DEFAULT_CORPUS_NAME} (Python {sys.version_info.major}.{sys.version_info.minor})"],
        )
    return data_dir
