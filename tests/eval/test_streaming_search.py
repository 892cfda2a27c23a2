"""Streaming multi-vector search: ``maxsim_topk`` keeps a running top-k per query and returns exactly
what ``torch.topk(maxsim_scores(...))`` returns, without ever holding the ``[queries × pages]`` matrix;
the benchmark runner's multi-vector metrics equal the old full-matrix path's on a real suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eval.build import build_suite
from eval.evaluate import BenchmarkRunner, EvalSettings, _per_language
from eval.metrics import evaluate_per_query, mean_metrics
from eval.retrieval import dense_topk, maxsim_scores, maxsim_topk, pad_multivectors, scores_to_run
from tests.eval.test_benchmark_eval import write_synth_root

REPO = Path(__file__).resolve().parents[2]


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def _padded(n: int, lmax: int, dim: int, seed: int, poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, lmax, dim]`` unit tokens with variable-length masks (some right-, some left-aligned);
    with ``poison`` the padding holds large values and NaN, so a masking bug cannot hide."""
    g = torch.Generator().manual_seed(seed)
    x = _unit(n, lmax, dim, seed=seed + 1)
    lens = torch.randint(1, lmax + 1, (n, 1), generator=g)
    m = torch.arange(lmax)[None] < lens
    m[::2] = torch.flip(m[::2], dims=[1])  # left padding on every other row
    if poison:
        x[~m] = 10.0
        x[:3][~m[:3]] = float("nan")
    return x, m


def _assert_same_topk(got: tuple[torch.Tensor, torch.Tensor], full: torch.Tensor, k: int) -> None:
    ref_s, ref_i = torch.topk(full, min(k, full.shape[1]), dim=1)
    s, ix = got
    assert s.shape == ix.shape == ref_s.shape and s.dtype == torch.float32 and ix.dtype == torch.int64
    # random continuous scores: no exact ties, so the order is defined
    assert bool((ref_s[:, :-1] > ref_s[:, 1:]).all())
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-6)
    assert torch.equal(ix, ref_i)
    assert torch.equal(s, torch.gather(full, 1, ix))  # the very scores of the full matrix, bitwise


CASES = [  # nq, nd, k, doc_chunk, query_chunk
    (23, 157, 10, 64, 16),  # chunks that divide neither side
    (23, 157, 10, 7, 5),  # doc chunks narrower than k
    (1, 157, 20, 32, 16),  # a single query
    (9, 12, 50, 5, 4),  # k > nd: every doc, sorted
    (9, 40, 40, 1000, 1000),  # one block holds everything
]


@pytest.mark.parametrize(("nq", "nd", "k", "dc", "qc"), CASES)
def test_maxsim_topk_equals_topk_of_the_full_matrix_on_padded_inputs(nq, nd, k, dc, qc) -> None:
    q, qm = _padded(nq, 9, 16, seed=nq, poison=False)
    d, dm = _padded(nd, 30, 16, seed=1000 + nd, poison=True)
    q[~qm] = float("nan")  # padding query tokens are never summed
    full = maxsim_scores(q, qm, d, dm, doc_chunk=dc, query_chunk=qc)
    assert not torch.isnan(full).any()
    _assert_same_topk(maxsim_topk(q, qm, d, dm, k, doc_chunk=dc, query_chunk=qc), full, k)


@pytest.mark.parametrize(("nq", "nd", "k", "dc", "qc"), CASES)
def test_maxsim_topk_equals_topk_of_the_full_matrix_on_lists(nq, nd, k, dc, qc) -> None:
    g = torch.Generator().manual_seed(nd)
    docs = [_unit(int(n), 16, seed=100 + i) for i, n in enumerate(torch.randint(1, 40, (nd,), generator=g))]
    queries = [_unit(int(n), 16, seed=9 + i) for i, n in enumerate(torch.randint(1, 9, (nq,), generator=g))]
    full = maxsim_scores(queries, None, docs, None, doc_chunk=dc, query_chunk=qc)
    got = maxsim_topk(queries, None, docs, None, k, doc_chunk=dc, query_chunk=qc)
    _assert_same_topk(got, full, k)
    # a padded doc side with a mask is the same search as the list
    dp, dm = pad_multivectors(docs)
    again = maxsim_topk(queries, None, dp, dm, k, doc_chunk=dc, query_chunk=qc)
    assert torch.equal(again[1], got[1])
    torch.testing.assert_close(again[0], got[0], rtol=0, atol=1e-6)


def test_maxsim_topk_rejects_bad_input_clearly() -> None:
    q, qm = _padded(3, 4, 8, seed=1, poison=False)
    d, dm = _padded(5, 6, 8, seed=2, poison=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        maxsim_topk(q, qm, d, dm, 0)
    with pytest.raises(ValueError, match="chunk sizes"):
        maxsim_topk(q, qm, d, dm, 3, doc_chunk=0)
    with pytest.raises(ValueError, match="no unmasked token"):
        maxsim_topk(q, qm, d, torch.zeros_like(dm), 3)
    s, ix = maxsim_topk(q[:0], qm[:0], d, dm, 3)
    assert s.shape == ix.shape == (0, 3)


def test_dense_topk_with_doc_chunks_narrower_than_k() -> None:
    """Three doc chunks of 2 for k = 6: the merged candidates stay fewer than k until the last chunk."""
    q, d = _unit(3, 8, seed=5), _unit(6, 8, seed=6)
    s, ix = dense_topk(q, d, 6, doc_batch_size=2)
    ref_s, ref_ix = torch.sort(q @ d.T, dim=1, descending=True)
    assert torch.equal(ix, ref_ix)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-6)


_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from eval.retrieval import maxsim_topk
    from tests.support.memory import peak_extra
    torch.set_num_threads(1)

    # The probe first: a fresh 256 MiB tensor is seen (nothing freed earlier can hide it).
    probe, _ = peak_extra(lambda: torch.ones(1 << 26).sum())
    nq, nd, k = 8192, 32768, 10  # a [nq, nd] fp32 score matrix would be 1 GiB, its bool mask 256 MiB
    q = torch.randn(nq, 1, 4, generator=torch.Generator().manual_seed(0))
    d = torch.randn(nd, 2, 4, generator=torch.Generator().manual_seed(1))
    dm = torch.ones(nd, 2, dtype=torch.bool)
    dm[::3, 1] = False  # padding: the bias-column path
    kw = dict(doc_chunk=2048, query_chunk=1024)
    maxsim_topk(q, None, d[:4096], dm[:4096], k, **kw)  # warm up kernels and the allocator
    peak, (s, ix) = peak_extra(lambda: maxsim_topk(q, None, d, dm, k, **kw))
    print(json.dumps({"probe": probe, "peak": peak, "shape": list(s.shape), "full": 4 * nq * nd}))
    """
)


def test_maxsim_topk_never_allocates_the_score_matrix() -> None:
    """Peak RSS in a fresh process while searching 8192 queries × 32768 docs: the full fp32 score
    matrix would add 1 GiB (its bool mask 256 MiB); the running top-k adds its reused buffers (16 MiB
    similarity block, 8 + 8 MiB reductions) and O(nq · k) results. The same probe sees a 256 MiB
    tensor, so a matrix cannot hide."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(REPO)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["probe"] > 200 << 20, m  # the probe sees big allocations
    assert m["shape"] == [8192, 10]
    assert m["peak"] < 128 << 20 < m["full"] // 4, m  # nor its bool mask (256 MiB)


# ----------------------------------------------------------------------------------------------------
# the benchmark runner on a real suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("streaming")
    write_synth_root(tmp / "synth", drop=((1, "zh"),))
    return build_suite(tmp / "synth", tmp / "suite")


@pytest.mark.parametrize(("depth", "ks"), [("cut", (1, 3, 5)), (100, (1, 5, 10))])
def test_multivector_metrics_equal_the_full_matrix_path(suite, tiny_models, depth, ks) -> None:
    """The runner's streaming search vs the old path (full MaxSim matrix → top depth → metrics), on
    the same encodings: every metric and every per-language metric equal to 1e-9, and the run the same
    documents with the same scores. "cut": the smallest depth >= 5 below the corpus size at which no
    query has two documents tied at the cut (a tie there lets either path keep either document; pages
    of one source share their image, and with random weights their scores can tie), so the top-k
    really cuts; depth 100 > corpus: every document, ties included."""
    from tasks.encoders import build_encoder
    from training.encoders import ENCODERS

    config = {"retriever": "multivector", "prompts": {"doc_text": "region_text"}}
    enc = build_encoder({"engine": "vlm-base", "model": "recipe:gemma3-tiny", "config": config}, ENCODERS)
    info = suite.sets[0]
    bench = suite.load(info)
    nd = len(bench.corpus_ids)
    assert nd > 5

    # the old path, on the runner's own corpus and query encodings
    probe = BenchmarkRunner(
        enc, EvalSettings(ks=ks, depth=nd, dense=False, text_view=False, maxsim_doc_chunk=5)
    )
    _, multi, _, _ = probe.encode_corpus(bench)
    qlangs = [x or "" for x in (bench.query_languages or [None] * len(bench.query_ids))]
    _, qe, qm = probe._encode_queries(list(bench.query_texts), qlangs, False, True)
    full = maxsim_scores(qe, qm, multi, None, doc_chunk=5, query_chunk=probe.settings.maxsim_query_chunk)
    if depth == "cut":
        ranked = torch.sort(full, dim=1, descending=True).values
        untied = [d for d in range(5, nd) if bool((ranked[:, d - 1] > ranked[:, d]).all())]
        assert untied, "every depth below the corpus size has a tie at the cut"
        depth = untied[0]
    settings = EvalSettings(ks=ks, depth=depth, dense=False, text_view=False, maxsim_doc_chunk=5)
    runner = BenchmarkRunner(enc, settings)
    got = runner.evaluate_set(info, bench)
    assert list(got.retrievers) == ["multivector"]
    old_run = scores_to_run(bench.query_ids, bench.corpus_ids, full, k=min(depth, nd))
    per_query = evaluate_per_query(bench.qrels, old_run, settings.ks)
    want = mean_metrics(per_query)
    mv = got.retrievers["multivector"]
    assert set(mv.metrics) == set(want)
    for name, value in want.items():
        assert mv.metrics[name] == pytest.approx(value, abs=1e-9), name
    assert 0.0 < want[f"ndcg@{ks[-1]}"] < 1.0  # a real ranking, neither empty nor trivially perfect

    lang_of = dict(zip(bench.query_ids, qlangs, strict=True))
    want_lang = _per_language(per_query, lang_of)
    assert set(mv.per_language) == set(want_lang) == {"en", "hi", "zh"}
    for lang, metrics in want_lang.items():
        assert mv.per_language[lang] == pytest.approx(metrics, abs=1e-9), lang

    # the same documents with the very same scores
    s, ix = runner._multi_search(qe, qm, multi, min(depth, nd))
    assert torch.equal(s, torch.gather(full, 1, ix))
    new_run = {
        q: {bench.corpus_ids[j]: v for j, v in zip(row, srow, strict=True)}
        for q, row, srow in zip(bench.query_ids, ix.tolist(), s.tolist(), strict=True)
    }
    assert new_run == old_run
