"""Source-language check: a page that is not English is a ``source_language`` reject, never an English
page; English pages (the demo samples, the English-name word lists of the test corpora) all pass."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.ingest import language
from tasks.ingest.config import IngestOptions
from tasks.ingest.language import check_page_language, guess_language
from tasks.schema import RejectReason
from tests.conftest import SAMPLES
from tests.support.documents import write_pdfs

ENGLISH = (
    "The committee reviewed the annual report on the state of the environment and recommended that its "
    "findings be published before the end of the year. Each chapter describes the methods used to collect "
    "the measurements, the uncertainty of every estimate, and the changes since the previous edition."
)
# English prose that names people and places in other languages (a title slide, a reference list).
ENGLISH_WITH_NAMES = (
    "On the Complexity of Block Partitioning. Jens Gramm, Till Nierhoff, Roded Sharan, Till Tantau. "
    "Universität Tübingen, Germany; Universität zu Lübeck, Germany; Tel-Aviv University, Israel. "
    "Workshop on Algorithms in Bioinformatics, 2006. References: M. Dupont, Théorie des graphes, Paris."
)
FRENCH = (
    "La Révolution française est une période de bouleversements politiques et sociaux en France et dans "
    "ses colonies, qui débute en 1789 et se termine en 1799. Elle met fin à l'Ancien Régime en remplaçant "
    "la monarchie absolue par une monarchie constitutionnelle, puis par la Première République."
)
FRENCH_2 = (
    "Les historiens considèrent qu'elle a profondément transformé la société française et influencé de "
    "nombreux pays européens au cours du siècle suivant. Ses principes, la liberté et l'égalité devant la "
    "loi, sont inscrits dans la Déclaration des droits de l'homme et du citoyen."
)
GERMAN = (
    "Die Stadt liegt am Ufer eines großen Sees und ist seit dem Mittelalter ein wichtiger Handelsplatz. Im "
    "neunzehnten Jahrhundert wurde die erste Eisenbahnlinie gebaut, die den Ort mit der Hauptstadt verband. "
    "Heute leben hier etwa dreißigtausend Menschen, und der Tourismus ist die wichtigste Einnahmequelle."
)
HINDI = (
    "भारत एक विशाल देश है जिसकी संस्कृति बहुत पुरानी और विविध है। यहाँ अनेक भाषाएँ बोली जाती हैं और हर राज्य "
    "की अपनी परंपराएँ हैं। देश की अर्थव्यवस्था तेज़ी से बढ़ रही है और शिक्षा के क्षेत्र में भी बहुत प्रगति हुई है।"
)


def _check(text: str, **options):
    return check_page_language(text, IngestOptions(**options), input_ref="doc.pdf", page_index=3)


def test_english_passes() -> None:
    assert _check(ENGLISH) is None
    assert _check(ENGLISH_WITH_NAMES, language_min_letters=50) is None
    assert guess_language(ENGLISH).lang == "en"


@pytest.mark.parametrize(("text", "lang"), [(FRENCH, "fr"), (GERMAN, "de"), (HINDI, "hi")])
def test_other_languages_are_source_language_rejects(text: str, lang: str) -> None:
    bad = _check(text, language_min_letters=100)
    assert bad is not None
    assert (bad.reason, bad.stage, bad.input_ref, bad.lang) == (
        RejectReason.SOURCE_LANGUAGE,
        "ingest",
        "doc.pdf",
        "en",
    )
    assert f"reads as {lang!r}" in bad.message and "page 3" in bad.message and "p=" in bad.message


def test_short_or_empty_text_passes_whatever_its_language() -> None:
    assert _check("") is None
    assert _check("   \n 12 34 — … ") is None
    assert _check("Introduction générale et plan du rapport annuel") is None  # 41 letters < 200
    assert _check(FRENCH, language_min_letters=10_000) is None  # a huge minimum turns the check off
    assert guess_language("").letters == 0


def test_digits_punctuation_and_rules_do_not_vote() -> None:
    """Only letters are read: a table of figures or box-drawing rules around English stays English."""
    table = ENGLISH + " " + " ".join(f"│ {i:>6} │ {i * 3.5:>8.2f} │ ──── ╭╮ █" for i in range(40))
    assert guess_language(table).lang == "en"
    assert _check(table) is None


def test_the_defaults_live_in_the_model_and_a_profile_table_is_read_through_it() -> None:
    fields = IngestOptions.model_fields
    assert fields["language_min_letters"].default == 200
    assert fields["language_min_margin"].default == 1.0
    # a raw [ingest] table (a mapping) works too, with the model's defaults for what it leaves out
    assert check_page_language(FRENCH, {"dpi": 144}, input_ref="x", page_index=0) is not None
    assert check_page_language(FRENCH, {"language_min_margin": 50.0}, input_ref="x", page_index=0) is None


def test_the_check_changes_the_ingest_config_hash() -> None:
    from tasks.ingest.plan import ingest_base_hash

    base = ingest_base_hash({"ingest": {}}, "fp")
    assert ingest_base_hash({"ingest": {"language_min_margin": 2.0}}, "fp") != base
    assert ingest_base_hash({"ingest": {"language_min_letters": 50}}, "fp") != base


def test_one_identifier_per_process_shared_by_threads(monkeypatch) -> None:
    monkeypatch.setattr(language, "_IDENTIFIER", None)
    built = []
    real = language._identifier

    texts = [ENGLISH, FRENCH, GERMAN, HINDI] * 8
    with ThreadPoolExecutor(8) as pool:
        guesses = list(pool.map(lambda t: (built.append(id(real())), guess_language(t).lang)[1], texts))
    assert guesses == ["en", "fr", "de", "hi"] * 8
    assert len(set(built)) == 1, "every thread got the same identifier"


def test_demo_sample_pages_are_english() -> None:
    """The text layers of the bundled born-digital samples (the demo corpus) all pass."""
    import pypdfium2 as pdfium

    from tasks.ingest.sources import PDFIUM_LOCK

    checked = 0
    for path in sorted(SAMPLES.glob("*.pdf")):
        with PDFIUM_LOCK:
            pdf = pdfium.PdfDocument(str(path))
            texts = []
            for page in pdf:
                tp = page.get_textpage()
                texts.append(tp.get_text_range())
                tp.close()
                page.close()
            pdf.close()
        for i, text in enumerate(texts):
            bad = check_page_language(text, None, input_ref=path.name, page_index=i)
            assert bad is None, bad
            checked += 1
    assert checked >= 10


# ---------------------------------------------------------------------------- ingest
def write_text_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A born-digital PDF (reportlab, ``invariant=1``) with each page's paragraphs wrapped in Helvetica."""
    from reportlab.lib.pagesizes import A5
    from reportlab.lib.utils import simpleSplit
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A5, invariant=1)
    width, height = A5
    for paragraphs in pages:
        y = height - 60
        for para in paragraphs:
            for line in simpleSplit(para, "Helvetica", 11, width - 80):
                c.setFont("Helvetica", 11)
                c.drawString(40, y, line)
                y -= 16
            y -= 10
        c.showPage()
    c.save()
    return path


def _ingest(root: Path, src: Path, profile: dict) -> dict[str, str]:
    """Plan one shard per source (as the flow does with pages_per_shard=1) and ingest each; returns
    {shard name: its source uris}."""
    from tasks.ingest.plan import plan_en_shards
    from tasks.ingest.shard import ingest_shard
    from tasks.ingest.sources import scan_sources

    plan = plan_en_shards(scan_sources(src), 1, set())
    for name, group in plan.items():
        ingest_shard(root, name, group, profile)
    return {name: ",".join(r.uri for r in group) for name, group in plan.items()}


def test_a_french_pdf_among_english_ones_is_rejected_and_changes_no_english_byte(
    tmp_path: Path, tiny_models
) -> None:
    from tasks.models import load_profile
    from tasks.shards import read_rejects

    profile = load_profile("tiny")
    english = tmp_path / "english"
    write_pdfs(english, 2, seed=3)  # the English-name word lists of the test corpora
    shutil.copy(SAMPLES / "title_page.pdf", english / "title_page.pdf")
    mixed = tmp_path / "mixed"
    shutil.copytree(english, mixed)
    write_text_pdf(mixed / "revolution.pdf", [[FRENCH, FRENCH_2]])
    write_text_pdf(mixed / "bilingual.pdf", [[ENGLISH, ENGLISH], [FRENCH, FRENCH_2]])

    only_en = _ingest(tmp_path / "out-en", english, profile)
    with_fr = _ingest(tmp_path / "out-mixed", mixed, profile)

    def shard_files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.glob("pages/en/*.parquet"))}

    def pages(root: Path) -> list[dict]:
        return [r for p in sorted(root.glob("pages/en/*.parquet")) for r in pq.read_table(p).to_pylist()]

    a, b = shard_files(tmp_path / "out-en"), shard_files(tmp_path / "out-mixed")
    assert set(only_en) <= set(with_fr)
    assert {n: b[n] for n in a} == a, "the English shards are byte-identical to a run without French"
    a_ids = {r["page_id"] for r in pages(tmp_path / "out-en")}
    b_pages = pages(tmp_path / "out-mixed")
    assert len(a_ids) == 3
    # the bilingual source keeps its English page 0; French pages are not English pages
    by_uri = {(r["source_uri"], r["page_index"]) for r in b_pages}
    assert ("bilingual.pdf", 0) in by_uri
    assert not {("revolution.pdf", 0), ("bilingual.pdf", 1)} & by_uri
    assert {r["page_id"] for r in b_pages if r["source_uri"] not in ("bilingual.pdf",)} == a_ids

    rejects = [
        r for r in read_rejects(tmp_path / "out-mixed").to_pylist() if r["reason"] == "source_language"
    ]
    assert sorted((r["input_ref"], r["message"].split(":")[0]) for r in rejects) == [
        ("bilingual.pdf", "page 1"),
        ("revolution.pdf", "page 0"),
    ]
    assert all("'fr'" in r["message"] for r in rejects), rejects
    assert not read_rejects(tmp_path / "out-en").num_rows, "no English page was rejected"
