"""Lossless text transforms applied before tokenization, and the bytes of the original text each
character of a transformed text stands for.

``caseops`` moves capitalization out of the letters and into operator characters, so that a
tokenizer sees "the", "The" and "THE" as one lowercase word (plus an operator) and spends its
vocabulary on more words instead of on case variants. Operators are private-use characters:

====================  ==========  =========================================================
operator              code point  meaning
====================  ==========  =========================================================
``TITLE``             U+E001      uppercase the next letter (at the start of a word)
``ALLCAPS``           U+E002      uppercase the whole following run of 2+ letters
``CAPNEXT``           U+E003      uppercase the next letter (inside a word)
``ESC``               U+E004      the next character is literal (one of U+E001..U+E005)
``SPACE_MARK_LITERAL`` U+E005     a literal U+2581 "▁" of the original text
====================  ==========  =========================================================

A *word* is a maximal run of cased letters. Lowercase words are unchanged; a word of 2+ letters
that are all uppercase becomes ``ALLCAPS`` + the word in lowercase; any other word gets ``TITLE``
before an uppercase first letter and ``CAPNEXT`` before every later uppercase letter, each
followed by the letter in lowercase ("McDonald" -> TITLE "mc" CAPNEXT "donald").

Which letters count: a *case pair* is an uppercase ``U`` and a lowercase ``l``, each one code
point, with ``U.lower() == l`` and ``l.upper() == U``, both assigned in Unicode 3.2 (713 pairs:
Latin, Greek, Cyrillic, Armenian, Deseret, fullwidth Latin, ...). Only letters of a pair are
lowered, so decoding ``l.upper()`` gives back exactly ``U``. Everything else is left as it is
and ends a word: 'ß' ('ß'.upper() is 'SS'), 'İ' ('İ'.lower() is 2 code points), the Kelvin sign
(lowers to 'k', whose upper is 'K'), titlecase digraphs, combining marks, letters without case.
Unicode's case-pair stability policy (no pair between assigned characters is ever added or
removed) makes this set the same under every Unicode version Python >= 3.10 ships; pairs of
characters assigned later (e.g. Georgian Mtavruli) are left out so that data encoded under one
Python decodes identically under another.

How it differs from the Parameter Golf record's ``lossless_caps_caseops_v1`` (PR #1855): same
operators at the same code points and the same word rules, but (1) cased letters are the 713
Unicode case pairs, not only ASCII A-Z; (2) a literal U+2581 becomes ``SPACE_MARK_LITERAL``,
because SentencePiece reads "▁" as its space symbol and would decode it as " " (the record's
transform passes it through, so such text does not round-trip through its tokenizer); (3) the
decoder accepts non-canonical but unambiguous input (e.g. ``TITLE`` inside a word) instead of
raising. On text without U+E005, U+2581 or non-ASCII cased letters the two produce identical
output.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
SPACE_MARK_LITERAL = "\ue005"
SPACE_MARK = "\u2581"  # SentencePiece's stand-in for a space
RESERVED = TITLE + ALLCAPS + CAPNEXT + ESC + SPACE_MARK_LITERAL  # escaped with ESC when literal
_MAX_CODE_POINT = 0x110000


class TransformError(ValueError):
    """A transformed text is malformed (a dangling operator), or a transform name is unknown."""


@dataclass(frozen=True)
class _CasePairs:
    upper_to_lower: dict[int, str]  # str.translate table
    lower_to_upper: dict[int, str]
    word_class: str  # regex class body: every letter of a pair
    lower_class: str  # regex class body: the lowercase letters of the pairs


def _class_body(chars: set[str]) -> str:
    """A regex character-class body for `chars`, as escaped ranges (short enough to compile fast)."""
    cps = sorted(ord(c) for c in chars)
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = re.escape(chr(cps[i])), re.escape(chr(cps[j]))
        parts.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "".join(parts)


@functools.cache
def case_pairs() -> _CasePairs:
    """The case pairs (see the module docstring), computed once per process (about 0.3 s)."""
    old = unicodedata.ucd_3_2_0
    up_to_low: dict[int, str] = {}
    for cp in range(_MAX_CODE_POINT):
        u = chr(cp)
        low = u.lower()
        if low == u or len(low) != 1 or low.upper() != u:
            continue
        if old.category(u) == "Cn" or old.category(low) == "Cn":  # assigned after Unicode 3.2
            continue
        up_to_low[cp] = low
    low_to_up = {ord(low): chr(cp) for cp, low in up_to_low.items()}
    uppers = {chr(cp) for cp in up_to_low}
    lowers = set(up_to_low.values())
    return _CasePairs(up_to_low, low_to_up, _class_body(uppers | lowers), _class_body(lowers))


@functools.cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    pairs = case_pairs()
    reserved = re.escape(RESERVED)
    encode = re.compile(f"(?P<lit>[{reserved}{SPACE_MARK}])|(?P<word>[{pairs.word_class}]+)")
    upper = re.compile(f"[{_class_body({chr(c) for c in pairs.upper_to_lower})}]")
    # One alternative per operator form; the last catches an operator that none of them fits.
    decode = re.compile(
        f"{ESC}(?P<esc>[{reserved}])"
        f"|[{TITLE}{CAPNEXT}](?P<one>[{pairs.lower_class}])"
        f"|{ALLCAPS}(?P<run>[{pairs.lower_class}]{{2,}})"
        f"|(?P<space>{SPACE_MARK_LITERAL})"
        f"|(?P<bad>[{reserved}])",
        re.DOTALL,
    )
    return encode, upper, decode


def _encode_word(word: str, pairs: _CasePairs, upper: re.Pattern[str]) -> str:
    if upper.search(word) is None:
        return word  # the common case: a lowercase word
    low = word.translate(pairs.upper_to_lower)
    if len(word) >= 2 and all(a != b for a, b in zip(word, low)):  # a word holds only pair letters: changed = uppercase
        return ALLCAPS + low
    out = []
    for i, (a, b) in enumerate(zip(word, low)):
        if a != b:
            out.append(TITLE if i == 0 else CAPNEXT)
        out.append(b)
    return "".join(out)


def caseops_encode(text: str) -> str:
    """The caseops form of `text` (see the module docstring); exactly inverted by :func:`caseops_decode`."""
    encode, upper, _ = _patterns()
    pairs = case_pairs()

    def sub(m: re.Match[str]) -> str:
        lit = m.group("lit")
        if lit is not None:
            return SPACE_MARK_LITERAL if lit == SPACE_MARK else ESC + lit
        return _encode_word(m.group("word"), pairs, upper)

    return encode.sub(sub, text)


def _bad_operator(text: str, m: re.Match[str]) -> TransformError:
    op = m.group("bad")
    where = f"at character {m.start()} of {len(text)}"
    following = text[m.start() + 1 : m.start() + 2]
    shown = repr(following) if following else "the end of the text"
    if op == ESC:
        return TransformError(f"caseops: ESC (U+E004) {where} is followed by {shown}, not an operator character to make literal")
    if op == ALLCAPS:
        return TransformError(f"caseops: ALLCAPS (U+E002) {where} is not followed by 2 or more lowercase cased letters")
    name = "TITLE (U+E001)" if op == TITLE else "CAPNEXT (U+E003)"
    return TransformError(f"caseops: {name} {where} is followed by {shown}, not a lowercase cased letter")


def _decode_matches(text: str) -> list[tuple[re.Match[str], str]]:
    """Each operator form in `text` with the original text it stands for; TransformError on a
    dangling operator."""
    _, _, decode = _patterns()
    lower_to_upper = case_pairs().lower_to_upper
    out = []
    for m in decode.finditer(text):
        kind = m.lastgroup
        if kind == "bad":
            raise _bad_operator(text, m)
        if kind == "esc":
            out.append((m, m.group("esc")))
        elif kind == "space":
            out.append((m, SPACE_MARK))
        else:
            out.append((m, m.group(kind).translate(lower_to_upper)))
    return out


def caseops_decode(text: str) -> str:
    """The original text of a caseops-transformed `text`. Any text whose operators are well formed
    decodes; on :func:`caseops_encode`'s output it is the exact inverse."""
    parts, pos = [], 0
    for m, original in _decode_matches(text):
        parts.append(text[pos : m.start()])
        parts.append(original)
        pos = m.end()
    parts.append(text[pos:])
    return "".join(parts)


def utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 byte length of each character of `text` (int64); lone surrogates count 3, as
    Python's "surrogatepass" encodes them (they cannot be in valid UTF-8 text anyway)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)


def caseops_original_bytes(text: str) -> np.ndarray:
    """For each character of the caseops-transformed `text`, the number of bytes of the original
    text it stands for: 0 for an operator (ESC, TITLE, ALLCAPS, CAPNEXT), the UTF-8 length of the
    uppercase letter for a letter an operator uppercases, the UTF-8 length of the character
    itself otherwise (U+E005 stands for "▁": 3 bytes either way). Sums to
    ``len(caseops_decode(text).encode())``."""
    counts = utf8_lengths(text)
    for m, original in _decode_matches(text):
        if m.lastgroup == "space":
            continue  # one 3-byte character for another
        counts[m.start()] = 0  # the operator
        counts[m.start() + 1 : m.end()] = utf8_lengths(original)
    return counts


# --------------------------------------------------------------------------------------------
# The transforms by name
# --------------------------------------------------------------------------------------------


def _identity(text: str) -> str:
    return text


@dataclass(frozen=True)
class TextTransform:
    """A lossless text transform: ``decode(encode(t)) == t`` for every str ``t``.

    ``id`` is what a byte sidecar's header stores; ``reserved`` are the characters a tokenizer
    for transformed text should keep as single pieces (SentencePiece user-defined symbols)."""

    name: str
    id: int
    encode: Callable[[str], str]
    decode: Callable[[str], str]
    original_bytes: Callable[[str], np.ndarray]
    reserved: tuple[str, ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.id == 0


IDENTITY = TextTransform("identity", 0, _identity, _identity, utf8_lengths)
CASEOPS = TextTransform("caseops", 1, caseops_encode, caseops_decode, caseops_original_bytes, tuple(RESERVED))
TRANSFORMS: dict[str, TextTransform] = {t.name: t for t in (IDENTITY, CASEOPS)}
_BY_ID = {t.id: t for t in TRANSFORMS.values()}


def get_transform(name: str) -> TextTransform:
    """The transform called `name`; TransformError listing the known ones otherwise."""
    t = TRANSFORMS.get(name) if isinstance(name, str) else None
    if t is None:
        raise TransformError(f"unknown text transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return t


def transform_by_id(tid: int) -> TextTransform | None:
    return _BY_ID.get(int(tid))
