"""Source-language check of an English page: a page whose text is in another language is bad input.

The pipeline reads every source page as English (``lang = "en"``, translated from ``eng_Latn``), so a
French page in a crawled corpus would be "translated" and given queries as if it were English. This
module tells such pages apart with langid.py over all of its 97 languages (restricting it to the
pipeline's 22 lets Indonesian pass as English and Vietnamese read as Chinese).

The test is langid's evidence *per letter*: ``(log P(text | L) - log P(text | en)) / letters`` for the
most likely language ``L``. langid's normalised probability cannot be the threshold: on a page of a
few hundred letters it is near 1.00 for whatever wins, e.g. Malay, Javanese or Tagalog for the
English-name word lists of the test corpora (``tests/support/documents.py``), whose margins are only
0.02-0.32 per letter; French, German, Spanish, Italian, Dutch or Indonesian prose scores 1.3-2.5
(Hindi, Russian, Chinese > 10).
Only letters are read (digits, punctuation and box-drawing characters dropped), so tables and rules
do not vote. The thresholds are :class:`tasks.ingest.config.IngestOptions` keys.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import regex

from tasks.ingest.config import IngestOptions
from tasks.schema import Reject, RejectReason

SOURCE_LANGUAGE = "en"  # what every source page is read as (the translators' eng_Latn)
_NOT_LETTERS = regex.compile(r"[^\p{L}\p{M}]+")
_LOCK = threading.Lock()
_IDENTIFIER: Any | None = None


def _identifier() -> Any:
    """langid.py's bundled model, built once per process (about 1 s) under a lock; read-only after."""
    global _IDENTIFIER
    with _LOCK:
        if _IDENTIFIER is None:
            from langid.langid import LanguageIdentifier, model

            _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=False)
        return _IDENTIFIER


@dataclass(frozen=True)
class LanguageGuess:
    """langid's verdict on a text: the most likely language, its probability (normalised over langid's
    languages), how much more likely it makes the text than English per letter (nats; 0 when it is
    English), and the number of letters read."""

    lang: str
    probability: float
    margin: float
    letters: int


def letters_only(text: str) -> str:
    """The letters (and combining marks) of ``text``, runs of anything else as one space."""
    return _NOT_LETTERS.sub(" ", text).strip()


def letter_count(text: str) -> int:
    """How many letters (and combining marks: Devanagari vowel signs count) ``text`` has."""
    return sum(not c.isspace() for c in letters_only(text))


def guess_language(text: str) -> LanguageGuess:
    """langid over the letters of ``text`` (see the module docstring for the margin)."""
    letters = letters_only(text)
    n = sum(not c.isspace() for c in letters)
    if not n:
        return LanguageGuess(SOURCE_LANGUAGE, 1.0, 0.0, 0)
    ident = _identifier()
    logp = np.asarray(ident.nb_classprobs(ident.instance2fv(letters)), dtype=np.float64)
    best = int(logp.argmax())
    probs = np.exp(logp - logp[best])
    english = logp[ident.nb_classes.index(SOURCE_LANGUAGE)]
    return LanguageGuess(
        lang=str(ident.nb_classes[best]),
        probability=float(1.0 / probs.sum()),
        margin=float((logp[best] - english) / n),
        letters=n,
    )


def check_page_language(
    text: str,
    options: IngestOptions | Mapping[str, Any] | None,
    *,
    input_ref: str,
    page_index: int,
) -> Reject | None:
    """A ``source_language`` rejects row when a page's text is not English, else None.

    Pages with fewer than ``language_min_letters`` letters (image-only, nearly empty) pass: langid
    cannot tell on so little. Others are rejected when langid's most likely language is not English
    and makes the text at least ``language_min_margin`` nats per letter more likely than English.
    Thread-safe (one identifier per process, read-only).
    """
    opts = (
        options if isinstance(options, IngestOptions) else IngestOptions.model_validate(dict(options or {}))
    )
    if letter_count(text) < opts.language_min_letters:
        return None
    guess = guess_language(text)
    if guess.lang == SOURCE_LANGUAGE or guess.margin < opts.language_min_margin:
        return None
    return Reject(
        stage="ingest",
        input_ref=input_ref,
        reason=RejectReason.SOURCE_LANGUAGE,
        message=(
            f"page {page_index}: text reads as {guess.lang!r}, not English (langid p={guess.probability:.2f},"
            f" {guess.margin:.2f} nats/letter over English ≥ {opts.language_min_margin:g},"
            f" {guess.letters} letters)"
        ),
        lang=SOURCE_LANGUAGE,
    )
