"""Rebuild the bundled English sample pages from their upstream Debian packages (documentation only).

The outputs in this folder are committed; this script is not run at build or test time. It records
exactly how each sample was made: which Debian package, which file inside it, which pages, and what
was done to them (pages cut with pypdfium2; image samples rasterised and, for the scan-like ones,
rotated, blurred, toned and noised with a fixed seed).

Usage (Debian/Ubuntu with apt; downloads ~140 MB of .deb files into a temporary folder, installs
nothing)::

    python assets/samples/make_samples.py                 # rebuild into assets/samples/
    python assets/samples/make_samples.py --src /tmp/x    # reuse an already extracted package tree
    python assets/samples/make_samples.py --check         # only verify the committed samples

Every upstream work here is under the LaTeX Project Public License (see LICENSES.md).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageFilter, PngImagePlugin

HERE = Path(__file__).resolve().parent

# Debian bookworm packages (version) the upstream PDFs come from.
DEBS = {
    "texlive-latex-base-doc": "2022.20230122-3",
    "texlive-latex-recommended-doc": "2022.20230122-3",
}
TL = "usr/share/doc/texlive-doc/latex"


@dataclass(frozen=True)
class Sample:
    """One bundled sample: where it comes from, what it looks like, and how it was made."""

    name: str  # output file name in this folder
    kind: str  # layout kind, for humans and tests
    package: str  # Debian binary package holding the upstream file
    path: str  # path of the upstream file inside the package
    sha256: str  # sha256 of that upstream file
    pages: tuple[int, ...]  # 0-based page indices cut from the upstream file
    mode: str  # "pdf" (cut pages), "png" (clean raster), "scan" (degraded raster, JPEG)
    ctan: str  # CTAN package the document belongs to
    copyright: str
    license: str  # SPDX id
    seed: int = 0  # for "scan": RNG seed of the noise
    angle: float = 0.0  # for "scan": rotation in degrees (counter-clockwise)


SAMPLES: tuple[Sample, ...] = (
    Sample(
        name="two_column_newsletter.pdf",
        kind="two-column newsletter/paper (title block, contents, 2 columns)",
        package="texlive-latex-base-doc",
        path=f"{TL}/base/ltnews35.pdf",
        sha256="6a55393a07561aa90c547e782eedb65b215bc49f3725baca8cc1e1e746cfe6d1",
        pages=(0, 1),
        mode="pdf",
        ctan="latex (LaTeX News, issue 35)",
        copyright="Copyright 2021-2022 The LaTeX Project",
        license="LPPL-1.3c",
    ),
    Sample(
        name="title_page.pdf",
        kind="title page (title, author, affiliation, abstract)",
        package="texlive-latex-recommended-doc",
        path=f"{TL}/subfig/subfig.pdf",
        sha256="68ddf3a3f000f1c3b317aa87008daab521ed4d919e1f5d34e344d31fe2348dc6",
        pages=(0,),
        mode="pdf",
        ctan="subfig",
        copyright="Steven Douglas Cochran (author; doc dated 2005-07-05)",
        license="LPPL-1.3c",
    ),
    Sample(
        name="manual_page.pdf",
        kind="manual page (part/section headings, prose, numbered list)",
        package="texlive-latex-base-doc",
        path=f"{TL}/fancyhdr/fancyhdr.pdf",
        sha256="6f653d59ff1c2047a58df78266c5cdf3ef9b2a68f58e34225925bba6dd2e70c6",
        pages=(5,),
        mode="pdf",
        ctan="fancyhdr",
        copyright="Pieter van Oostrum (author and maintainer)",
        license="LPPL-1.3c",
    ),
    Sample(
        name="list_page.pdf",
        kind="list-heavy page (bulleted and nested lists, command box)",
        package="texlive-latex-base-doc",
        path=f"{TL}/base/usrguide.pdf",
        sha256="f4dceb77c9c9257e1dc7d4d6af541c5a13b49bff94d95b9d85f46be252c41591",
        pages=(17,),
        mode="pdf",
        ctan="latex (usrguide: LaTeX for authors)",
        copyright="Copyright 2020-2022 The LaTeX Project",
        license="LPPL-1.3c",
    ),
    Sample(
        name="table_page.pdf",
        kind="table-heavy page (three tables between paragraphs)",
        package="texlive-latex-recommended-doc",
        path=f"{TL}/booktabs/booktabs.pdf",
        sha256="7052d0760750c97a9fa3ae6e00942768a809f84a05466d36dc9e38f906d98dfe",
        pages=(1,),
        mode="pdf",
        ctan="booktabs",
        copyright="Copyright (C) 1995-2020 Simon Fear",
        license="LPPL-1.3c",
    ),
    Sample(
        name="figure_caption_page.pdf",
        kind="figures with captions, equations, prose",
        package="texlive-latex-base-doc",
        path=f"{TL}/geometry/geometry.pdf",
        sha256="75624407406f1f1e9214e481e0628437bb1ff8a0f1b6598ca78ed680ba479d81",
        pages=(2,),
        mode="pdf",
        ctan="geometry",
        copyright="Copyright (C) 1996-2010 Hideo Umeki; (C) 2018- Hideo Umeki and David Carlisle",
        license="LPPL-1.3c",
    ),
    Sample(
        name="contents_page.pdf",
        kind="table of contents (dot leaders, page numbers, coloured links)",
        package="texlive-latex-recommended-doc",
        path=f"{TL}/caption/caption.pdf",
        sha256="12541208650d12a9e3ad7af10af81ae602b673b10e04c5ec6d95c824207d1908",
        pages=(1,),
        mode="pdf",
        ctan="caption",
        copyright="Copyright (C) 1994-2022 Axel Sommerfeldt",
        license="LPPL-1.3c",
    ),
    Sample(
        name="slides.pdf",
        kind="presentation slides, landscape (title slide; coloured blocks)",
        package="texlive-latex-recommended-doc",
        path=f"{TL}/beamer/beamerexample-conference-talk.pdf",
        sha256="4b11425166212ed695a5c99506303bddd7cc1beb02b17da48565c48f51eb38d6",
        pages=(0, 4),
        mode="pdf",
        ctan="beamer (example talk)",
        copyright="Copyright 2007 Till Tantau",
        license="LPPL-1.3c",
    ),
    Sample(
        name="page_image.png",
        kind="plain raster page (section headings, nested lists), 150 dpi RGB PNG",
        package="texlive-latex-base-doc",
        path=f"{TL}/hyperref/paper.pdf",
        sha256="31629237d207b5b4c511e52991f9804de5bb6cbe39cec8a8a2d4adb67c62bf0e",
        pages=(2,),
        mode="png",
        ctan="hyperref (EuroTeX'99 paper)",
        copyright="Heiko Oberdiek (author, 1999); hyperref bundle now maintained by The LaTeX Project",
        license="LPPL-1.3c",
    ),
    Sample(
        name="page_image_color.png",
        kind="colour figure page (spectrum figure, colour table, code), 150 dpi PNG",
        package="texlive-latex-recommended-doc",
        path=f"{TL}/xcolor/xcolor.pdf",
        sha256="d354360b1216cf8c9618571434a34e9e7683c2cec426e6156b4c5fb80af49e41",
        pages=(31,),
        mode="png",
        ctan="xcolor",
        copyright="Copyright (C) 2003-2021 Uwe Kern; (C) 2021-2022 The LaTeX Project",
        license="LPPL-1.3c",
    ),
    Sample(
        name="scanned_paper_page.jpg",
        kind="scanned-looking first page of a paper (title, abstract, lists)",
        package="texlive-latex-base-doc",
        path=f"{TL}/hyperref/paper.pdf",
        sha256="31629237d207b5b4c511e52991f9804de5bb6cbe39cec8a8a2d4adb67c62bf0e",
        pages=(0,),
        mode="scan",
        ctan="hyperref (EuroTeX'99 paper)",
        copyright="Heiko Oberdiek (author, 1999); hyperref bundle now maintained by The LaTeX Project",
        license="LPPL-1.3c",
        seed=1999,
        angle=0.8,
    ),
    Sample(
        name="scanned_table_page.jpg",
        kind="scanned-looking table page (large ruled table, prose, code box)",
        package="texlive-latex-base-doc",
        path=f"{TL}/base/fntguide.pdf",
        sha256="fb1b5ecbdf1a1b39698896ac567c0525f65de2202107b504f5c0dc76e5e69be4",
        pages=(7,),
        mode="scan",
        ctan="latex (fntguide: LaTeX2e font selection)",
        copyright="Copyright 1995-2022 The LaTeX Project",
        license="LPPL-1.3c",
        seed=2022,
        angle=-1.2,
    ),
)

SCAN_DPI = 150
PNG_DPI = 150
JPEG_QUALITY = 72


# ----------------------------------------------------------------------------- upstream files
def fetch_sources(dest: Path) -> Path:
    """Download the Debian packages with `apt-get download` and unpack them (no install) under dest."""
    debs = dest / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *[f"{p}={v}" for p, v in DEBS.items()]], cwd=debs, check=True)
    root = dest / "root"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- transforms
def cut_pdf(src: Path, pages: tuple[int, ...], out: Path, info: dict[str, str]) -> None:
    """Copy the given pages (with their fonts and images) into a new PDF carrying `info` as metadata."""
    doc = pdfium.PdfDocument(src)
    new = pdfium.PdfDocument.new()
    new.import_pages(doc, list(pages))
    for page in new:
        drop_internal_links(page)
    buf = io.BytesIO()
    new.save(buf)
    new.close()
    doc.close()
    out.write_bytes(with_info(buf.getvalue(), info))


def drop_internal_links(page: pdfium.PdfPage) -> None:
    """Remove link annotations that jump inside the upstream document (their targets were not cut).

    Web links (URI actions) stay. Links carry no appearance in these files, so rendering is unchanged.
    """
    for i in reversed(range(pdfium_c.FPDFPage_GetAnnotCount(page))):
        annot = pdfium_c.FPDFPage_GetAnnot(page, i)
        try:
            if pdfium_c.FPDFAnnot_GetSubtype(annot) != pdfium_c.FPDF_ANNOT_LINK:
                continue
            action = pdfium_c.FPDFLink_GetAction(pdfium_c.FPDFAnnot_GetLink(annot))
            if action and pdfium_c.FPDFAction_GetType(action) == pdfium_c.PDFACTION_URI:
                continue
        finally:
            pdfium_c.FPDFPage_CloseAnnot(annot)
        pdfium_c.FPDFPage_RemoveAnnot(page, i)


def _pdf_text(value: str) -> bytes:
    """A PDF text string (UTF-16BE with BOM, as hex: no escaping questions)."""
    return b"<FEFF" + value.encode("utf-16-be").hex().upper().encode() + b">"


def with_info(data: bytes, info: dict[str, str]) -> bytes:
    """Make a PDFium-saved file reproducible and self-describing.

    PDFium stamps the save time and a random /ID; both are replaced in place by fixed, same-length
    values (so the xref offsets stay valid), then an incremental update appends a document-info
    dictionary (Title/Author/Subject/Keywords) that points back to the upstream file and licence.
    """
    data = re.sub(rb"/CreationDate\(D:\d{14}\+00'00'\)", b"/CreationDate(D:20230122000000+00'00')", data)
    trailer = data[data.rindex(b"trailer") :]
    ids = re.search(rb"/ID\s*\[\s*<([0-9A-Fa-f]{32})>\s*<([0-9A-Fa-f]{32})>\s*\]", trailer)
    if ids is None or b"xref" not in data[-200_000:]:
        raise ValueError("unexpected PDFium output: no classic xref/trailer with /ID")
    blank = data.replace(ids.group(1), b"0" * 32).replace(ids.group(2), b"0" * 32)
    file_id = hashlib.md5(blank).hexdigest().upper().encode()
    data = data.replace(ids.group(1), file_id).replace(ids.group(2), file_id)
    root = re.search(rb"/Root\s+(\d+)\s+0\s+R", trailer).group(1)
    size = int(re.search(rb"/Size\s+(\d+)", trailer).group(1))
    prev = int(re.search(rb"startxref\s+(\d+)", trailer).group(1))
    if not data.endswith(b"\n"):
        data += b"\r\n"
    entries = b"".join(b"/" + k.encode() + _pdf_text(v) for k, v in info.items())
    obj_at = len(data)
    data += b"%d 0 obj\r\n<<" % size + entries + b">>\r\nendobj\r\n"
    xref_at = len(data)
    data += b"xref\r\n%d 1\r\n%010d 00000 n\r\n" % (size, obj_at)
    data += b"trailer\r\n<</Size %d/Root %s 0 R/Info %d 0 R/Prev %d/ID[<%s><%s>]>>\r\n" % (
        size + 1,
        root,
        size,
        prev,
        file_id,
        file_id,
    )
    return data + b"startxref\r\n%d\r\n%%%%EOF\r\n" % xref_at


def render(src: Path, index: int, dpi: int, grey: bool = False) -> Image.Image:
    """Rasterise one page at `dpi` (white background)."""
    doc = pdfium.PdfDocument(src)
    img = doc[index].render(scale=dpi / 72, grayscale=grey).to_pil()
    doc.close()
    return img.convert("L" if grey else "RGB")


def scan_look(page: Image.Image, seed: int, angle: float) -> Image.Image:
    """Make a clean greyscale raster look like a flatbed scan of a printed page.

    Paper tone and uneven lighting (grey, slightly darker towards one corner), a small skew, the
    softness of scanner optics, sensor noise and a faint dark border where the lid did not close.
    """
    rng = np.random.default_rng(seed)
    # the skew: rotate the page, filling the uncovered corners with paper white
    img = page.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=255)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.7))
    a = np.asarray(img, dtype=np.float32) / 255.0
    h, w = a.shape
    # paper tone: white -> light grey; ink stays dark
    paper = 0.86 + 0.04 * rng.random()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 - 0.06 * ((xx / w) * 0.6 + (yy / h) * 0.4)  # uneven illumination
    a = (0.10 + a * (paper - 0.10)) * light
    # sensor noise + a little salt-and-pepper dust
    a += rng.normal(0.0, 0.025, size=a.shape).astype(np.float32)
    dust = rng.random(a.shape) < 0.0004
    a[dust] = rng.uniform(0.1, 0.4, size=int(dust.sum())).astype(np.float32)
    # dark border (scanner lid) on the left and top edges
    border = max(4, w // 120)
    a[:, :border] *= np.linspace(0.35, 1.0, border, dtype=np.float32)[None, :]
    a[:border, :] *= np.linspace(0.35, 1.0, border, dtype=np.float32)[:, None]
    return Image.fromarray((np.clip(a, 0.0, 1.0) * 255).astype(np.uint8), mode="L")


def page_text(src: Path, index: int) -> str:
    """Text layer of one upstream page (the ground truth for an image sample)."""
    doc = pdfium.PdfDocument(src)
    text = doc[index].get_textpage().get_text_range()
    doc.close()
    return text.replace("\r\n", "\n")


MODIFICATION = {
    "pdf": "cut out unchanged (PDFium page import; internal links to pages not cut removed; metadata set)",
    "png": "rasterised at 150 dpi",
    "scan": "rasterised at 150 dpi, rotated, blurred, toned and noised to look scanned",
}


def provenance(s: Sample) -> str:
    """The change notice each sample carries inside itself (LPPL-1.3c clause 6b)."""
    pages = ", ".join(str(p + 1) for p in s.pages)
    return (
        f"Page{'s' if len(s.pages) > 1 else ''} {pages} of {Path(s.path).name} "
        f"({s.ctan}; Debian {s.package} {DEBS[s.package]}), "
        f"{MODIFICATION[s.mode]}, for the m3dr samples; see LICENSES.md beside this file."
    )


# ----------------------------------------------------------------------------- build + check
def build(root: Path, out: Path) -> None:
    """Produce every sample into `out`, with ground-truth text for the image samples."""
    gt = out / "ground_truth"
    gt.mkdir(parents=True, exist_ok=True)
    for s in SAMPLES:
        src = root / s.path
        digest = sha256(src)
        if s.sha256 and digest != s.sha256:
            raise SystemExit(f"{s.name}: upstream {s.path} changed (sha256 {digest})")
        target = out / s.name
        if s.mode == "pdf":
            info = {
                "Title": f"{s.kind} - sample from {Path(s.path).name}",
                "Author": s.copyright,
                "Subject": provenance(s),
                "Keywords": f"{s.license}; upstream sha256 {digest}",
                "Creator": "m3dr assets/samples/make_samples.py",
            }
            cut_pdf(src, s.pages, target, info)
        elif s.mode == "png":
            info = PngImagePlugin.PngInfo()
            info.add_text("Copyright", f"{s.copyright}; {s.license}")
            info.add_text("Comment", provenance(s))
            render(src, s.pages[0], PNG_DPI).save(target, optimize=True, pnginfo=info, dpi=(PNG_DPI, PNG_DPI))
        elif s.mode == "scan":
            img = scan_look(render(src, s.pages[0], SCAN_DPI, grey=True), s.seed, s.angle)
            img.save(
                target,
                quality=JPEG_QUALITY,
                optimize=True,
                dpi=(SCAN_DPI, SCAN_DPI),
                comment=f"{provenance(s)} {s.copyright}; {s.license}".encode(),
            )
        else:
            raise ValueError(s.mode)
        if s.mode in {"png", "scan"}:
            (gt / f"{Path(s.name).stem}.txt").write_text(page_text(src, s.pages[0]), encoding="utf-8")
        print(f"{s.name:28s} <- {s.package}:{s.path} pages {[p + 1 for p in s.pages]} sha256 {digest[:12]}")
    write_manifest(out)


def write_manifest(out: Path) -> None:
    """samples.json: the table in LICENSES.md in machine-readable form (for tests and the demo)."""
    rows = []
    for s in SAMPLES:
        f = out / s.name
        row = {
            "name": s.name,
            "kind": s.kind,
            "format": f.suffix.lstrip("."),
            "pages": len(s.pages),
            "text_layer": s.mode == "pdf",
            "ground_truth": None if s.mode == "pdf" else f"ground_truth/{f.stem}.txt",
            "bytes": f.stat().st_size,
            "sha256": sha256(f),
            "license": s.license,
            "copyright": s.copyright,
            "ctan": s.ctan,
            "debian_package": f"{s.package} {DEBS[s.package]}",
            "upstream_path": "/" + s.path,
            "upstream_pages": [p + 1 for p in s.pages],  # 1-based physical page numbers
            "upstream_sha256": s.sha256,
            "modification": MODIFICATION[s.mode],
        }
        if s.mode == "scan":
            row["scan"] = {
                "dpi": SCAN_DPI,
                "angle_deg": s.angle,
                "seed": s.seed,
                "jpeg_quality": JPEG_QUALITY,
            }
        rows.append(row)
    (out / "samples.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


ENGLISH = {"the", "of", "and", "to", "is", "in", "a", "for", "that", "be", "with", "are", "this", "by"}


def words(text: str) -> list[str]:
    """Latin-script words of a text (what the word counts in README.md count)."""
    return re.findall(r"[A-Za-z][A-Za-z'-]+", text)


def check(out: Path) -> list[dict]:
    """Verify every sample: it opens and renders, PDFs carry an English text layer, hashes match."""
    listed = {}
    if (out / "samples.json").exists():
        listed = {r["name"]: r["sha256"] for r in json.loads((out / "samples.json").read_text())}
    report = []
    for s in SAMPLES:
        f = out / s.name
        row = {"name": s.name, "bytes": f.stat().st_size, "kind": s.kind}
        if f.suffix == ".pdf":
            doc = pdfium.PdfDocument(f)
            row["pages"] = len(doc)
            text = "\n".join(doc[i].get_textpage().get_text_range() for i in range(len(doc)))
            img = doc[0].render(scale=1.0).to_pil()
            row["size_pt"] = [round(v) for v in doc[0].get_size()]
            doc.close()
        else:
            img = Image.open(f)
            img.load()
            row["pages"] = 1
            text = (out / "ground_truth" / f"{f.stem}.txt").read_text(encoding="utf-8")
            row["size_px"] = list(img.size)
        ws = [w.lower() for w in words(text)]
        row["words"] = len(ws)
        row["english_ratio"] = round(sum(w in ENGLISH for w in ws) / max(len(ws), 1), 3)
        row["ink"] = round(1 - float(np.asarray(img.convert("L")).mean()) / 255, 3)  # rendered, not blank
        assert row["words"] >= 8, row
        assert row["ink"] > 0.01, row
        assert f.suffix != ".pdf" or row["english_ratio"] >= 0.08, row  # common English words present
        assert s.name not in listed or listed[s.name] == sha256(f), f"{s.name} differs from samples.json"
        report.append(row)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, help="an already unpacked package tree (root of dpkg-deb -x)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true", help="only verify the samples in --out")
    args = ap.parse_args()
    if not args.check:
        if args.src:
            build(args.src, args.out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                build(fetch_sources(Path(tmp)), args.out)
    for row in check(args.out):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
