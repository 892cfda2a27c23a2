"""DocLayout-YOLO pages/s: one page per call vs the detector's batches, side by side on one machine.

Pages are the demo samples (``assets/samples``) rendered by the ingest stage (144 dpi), those of the
most common page size, repeated to ``--pages`` (a shard's pages from one source usually share a size).
The checkpoint is the tiny recipe's random DocLayout-YOLO (``--scale n``) or the DocStructBench
architecture ``yolov10m-doclayout.yaml`` (``--scale m``), random weights with BatchNorm statistics measured
on a page (``tests/support/layout_models.py``: as built, the recipe's output does not depend on the page,
which would hide any numeric difference): speed, not detection quality. Each row is the best of
``--repeat`` timed passes.

Rows (one warm-up call per detector first):

- ``one-per-call``: ``detect(page)`` per page (what the ingest driver did before);
- ``detect_batch b``: the driver's path, ``detect_batch`` over chunks of ``b`` pages with
  ``batch_size = b``: on CUDA, same-size pages share a model call; on CPU every page still gets its own
  call (a batch is not faster there and its rounding differs), so these rows measure only the overhead;
- ``stacked b`` (CPU only): the CUDA path forced on CPU, to show why CPU does not stack; with the largest
  difference of its boxes and scores from one page per call (at ``conf`` 0: every box compared).

On CPU ``detect_batch`` output is checked equal to one page per call (exactly) before any figure prints.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/layout_batch.py      # CPU, tiny recipe
    PYTHONPATH=$PWD .venv/bin/python benchmarks/layout_batch.py --device cuda --half --scale m --pages 64 \
        --batches 1,8,16,32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sample_pages(n: int) -> list[Any]:
    """``n`` page images of the samples' most common size, rendered as the ingest stage renders them."""
    from tasks.ingest.config import IngestOptions
    from tasks.ingest.sources import SourcePage, iter_source_pages

    opts = IngestOptions()
    images = []
    for path in sorted((REPO / "assets" / "samples").glob("*.pdf")):
        for item in iter_source_pages(path, dpi=opts.dpi, max_side=opts.max_side, min_side=opts.min_side):
            if isinstance(item, SourcePage):
                images.append(item.image)
    size, _ = Counter(im.size for im in images).most_common(1)[0]
    same = [im for im in images if im.size == size]
    return [same[i % len(same)] for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Any, device: str, repeat: int) -> tuple[Any, float]:
    """``fn()``'s result and its best wall time over ``repeat`` runs."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--half", action="store_true", help="fp16 on CUDA (the profile default there)")
    ap.add_argument("--scale", default="n", help="n: the tiny recipe; m: the DocStructBench architecture")
    ap.add_argument("--pages", type=int, default=16)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--imgsz", type=int, default=1024)
    ap.add_argument("--conf", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per row (best kept)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from tasks.ingest.layout import build_layout_detector
    from tasks.models import sha256_file
    from tests.support.layout_models import calibrated_doclayout_yolo

    batches = [int(b) for b in args.batches.split(",")]
    cuda = args.device.startswith("cuda")
    pages = sample_pages(args.pages)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = calibrated_doclayout_yolo(Path(tmp), pages[0], scale=args.scale)

        def detector(batch_size: int, conf: float | None = None) -> Any:
            return build_layout_detector(
                {
                    "engine": "doclayout-yolo",
                    "model": str(ckpt),
                    "sha256": sha256_file(ckpt),
                    "imgsz": args.imgsz,
                    "conf": args.conf if conf is None else conf,
                    "device": args.device,
                    "half": args.half,
                    "batch_size": batch_size,
                    "threads": None if cuda else args.threads,
                }
            )

        one = detector(1)
        one.detect(pages[0])  # warm-up
        base, secs = timed(lambda: [one.detect(p) for p in pages], args.device, args.repeat)
        rows: list[dict[str, Any]] = [{"mode": "one-per-call", "batch": 1, "pages_per_s": len(pages) / secs}]
        for b in batches:
            det = detector(b)
            det.detect_batch(pages[:b])  # warm-up at this batch shape
            got, secs = timed(
                lambda det=det, b=b: [
                    r for i in range(0, len(pages), b) for r in det.detect_batch(pages[i : i + b])
                ],
                args.device,
                args.repeat,
            )
            row: dict[str, Any] = {"mode": "detect_batch", "batch": b, "pages_per_s": len(pages) / secs}
            row["pages_per_model_call"] = det.stack
            if not cuda:
                assert got == base, f"batch {b}: detect_batch differs from one page per call on CPU"
                row["equal_to_one_per_call"] = True
            rows.append(row)
        if not cuda:
            exact = detector(1, conf=0.0)
            raw_one = [exact._predict([p])[0].boxes.data for p in pages[: max(batches)]]
            for b in batches:
                if b == 1:
                    continue
                det = detector(b)
                det.stack = b  # the CUDA path, forced
                det.detect_batch(pages[:b])
                _, secs = timed(
                    lambda det=det, b=b: [
                        det.detect_batch(pages[i : i + b]) for i in range(0, len(pages), b)
                    ],
                    args.device,
                    args.repeat,
                )
                exact.stack = b
                raw = [r.boxes.data for r in exact._predict(pages[:b])]
                diff = max(float((x - y).abs().max()) for x, y in zip(raw_one[:b], raw, strict=True))
                rows.append(
                    {"mode": "stacked", "batch": b, "pages_per_s": len(pages) / secs, "max_diff": diff}
                )

    ref = rows[0]["pages_per_s"]
    params = sum(p.numel() for p in one.model.model.parameters())
    print(
        f"DocLayout-YOLO scale {args.scale} ({params / 1e6:.1f} M params), imgsz {args.imgsz}, device "
        f"{one.device}{' fp16' if one.half else ' fp32'}, {len(pages)} pages of {pages[0].size[0]}x"
        f"{pages[0].size[1]}, torch threads {torch.get_num_threads()}"
    )
    for r in rows:
        extra = f"  max |Δ| boxes/scores vs one-per-call {r['max_diff']:.2e}" if "max_diff" in r else ""
        extra += f"  ({r['pages_per_model_call']} page(s)/model call)" if "pages_per_model_call" in r else ""
        extra += "  (== one-per-call)" if r.get("equal_to_one_per_call") else ""
        print(
            f"  {r['mode']:<13} batch {r['batch']:>3}: {r['pages_per_s']:7.2f} pages/s  "
            f"x{r['pages_per_s'] / ref:.2f}{extra}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": one.device, "half": one.half, "scale": args.scale, "params": params}
        args.json.write_text(json.dumps({**meta, "imgsz": args.imgsz, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
