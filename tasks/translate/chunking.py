"""Sentence splitting and chunking of region text before translation.

NLLB degrades past ~200 tokens and drops trailing sentences of long inputs, so every text is cut into
blocks (paragraphs, list items) and sentence chunks of at most ``max_tokens`` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_MAX_CHUNK_TOKENS = 64


# Words whose trailing period does not end a sentence (lower-cased, without the final period).
_ABBREVIATION_WORDS = (
    "e.g i.e etc al fig figs eq eqs eqn vol vols pp p sec secs ch chap cf approx vs viz dr mr mrs ms prof st "
    "jr sr inc ltd co corp dept tab ref refs resp ca ed eds jan feb mar apr jun jul aug sep sept oct nov dec "
    "u.s u.k ph.d a.m p.m"
)
_ABBREVIATIONS = frozenset(_ABBREVIATION_WORDS.split())
# Only before a number ("No. 5"); "no." at a sentence end is the word.
_NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "nr"})
_BOUNDARY = re.compile(r"([.!?…]+)([\"'”’)\]]*)(\s+)")
_LIST_START = re.compile(r"^\s*(?:[•◦▪●‣*–—-]\s|\(?\d{1,3}[.)]\s|\(?[a-zA-Z][.)]\s)")
_SENTENCE_END = re.compile(r"[.!?…:][\"'”’)\]]*\s*$")


def canonical_text(text: str) -> str:
    """Canonical form used for dedupe and caching: spaces collapsed per line, blank-line runs kept as one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return out.strip()


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph (no newlines) into sentences at ``. ? !`` followed by space.

    No split after known abbreviations (e.g., Fig., et al.), single-letter initials, or before a
    lower-case continuation; decimals never split (no space after their point).
    """
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(paragraph):
        end_punct, nxt = m.end(2), m.end(3)
        if nxt >= len(paragraph):
            break
        following = paragraph[nxt]
        if following.islower():
            continue
        if m.group(1) == ".":
            before = paragraph[start : m.start(1)].split()
            word = before[-1].lstrip("([\"'“‘").lower() if before else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
            if word in _NUMBER_ABBREVIATIONS and following.isdigit():
                continue
        sentence = paragraph[start:end_punct].strip()
        if sentence:
            out.append(sentence)
        start = nxt
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def split_blocks(text: str) -> tuple[list[str], list[str]]:
    """Split normalised text into blocks and the separators between them.

    Blank lines are paragraph breaks (``"\\n\\n"``); a line starting a list item keeps its line break
    (``"\\n"``); other single newlines are line wraps of the source layout and become spaces (a line
    ending in a hyphen is joined without one).
    """
    blocks: list[str] = []
    seps: list[str] = []
    for p_idx, para in enumerate(text.split("\n\n")):
        if p_idx:
            seps.append("\n\n")
        current = ""
        for l_idx, line in enumerate(para.split("\n")):
            line = line.strip()
            if l_idx and _LIST_START.match(line) and current:
                blocks.append(current)
                seps.append("\n")
                current = line
            elif not current:
                current = line
            elif current.endswith("-") and line[:1].islower():
                current += line
            else:
                current += " " + line
        blocks.append(current)
    return blocks, seps


def _pack(units: Iterable[tuple[str, int]], max_tokens: int) -> list[str]:
    """Greedily join (text, n_tokens) units with spaces into pieces of at most ``max_tokens`` tokens
    (a unit that is alone over the budget still forms its own piece)."""
    out: list[str] = []
    cur, cur_n = "", 0
    for text, n in units:
        if cur and cur_n + n > max_tokens:
            out.append(cur)
            cur, cur_n = "", 0
        cur = f"{cur} {text}" if cur else text
        cur_n += n
    if cur:
        out.append(cur)
    return out


def _split_long(sentence: str, n_tokens, max_tokens: int) -> list[str]:
    """Cut a sentence that exceeds ``max_tokens`` at clause marks, then at word boundaries."""
    for pattern in (r"(?<=[;:])\s+", r"(?<=,)\s+", r"\s+"):
        parts = [p for p in re.split(pattern, sentence) if p]
        if len(parts) > 1:
            break
    else:
        return [sentence]
    pieces = _pack(zip(parts, n_tokens(parts), strict=True), max_tokens)
    result: list[str] = []
    for piece in pieces:
        if len(pieces) > 1 and n_tokens([piece])[0] > max_tokens:
            result.extend(_split_long(piece, n_tokens, max_tokens))
        else:
            result.append(piece)
    return result


def chunk_block(block: str, n_tokens, max_tokens: int = DEFAULT_MAX_CHUNK_TOKENS) -> list[str]:
    """Sentences of one block packed greedily into chunks of at most ``max_tokens`` tokens, in order.

    A single sentence longer than the budget is cut at clause marks / words so nothing is dropped.
    """
    sentences = split_sentences(block)
    if not sentences:
        return []
    counts = n_tokens(sentences)
    units: list[tuple[str, int]] = []
    for s, n in zip(sentences, counts, strict=True):
        if n > max_tokens:
            pieces = _split_long(s, n_tokens, max_tokens)
            units.extend(zip(pieces, n_tokens(pieces), strict=True))
        else:
            units.append((s, n))
    return _pack(units, max_tokens)
