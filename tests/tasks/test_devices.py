"""GPU placement of stage engines (tasks.devices), checked with fake device counts and worker ranks."""

from __future__ import annotations

import pytest

from tasks.devices import RANK_ENV, Placement, place, worker_rank


def test_cpu() -> None:
    assert place("cpu", visible=0, rank=3) == Placement("cpu", (0,))
    assert place("CPU").torch_device == "cpu"


@pytest.mark.parametrize(
    ("device", "index", "visible", "rank", "want"),
    [
        ("cuda", None, 4, None, (0, 1, 2, 3)),  # a lone process: every visible GPU (one replica each)
        ("cuda", None, 4, 0, (0,)),
        ("cuda", None, 4, 2, (2,)),
        ("cuda", None, 4, 5, (1,)),  # more workers than GPUs: round robin
        ("cuda", [2, 3], 4, 0, (2,)),
        ("cuda", [2, 3], 4, 1, (3,)),
        ("cuda", [2, 3], 4, 2, (2,)),
        ("cuda", [2, 3], 4, None, (2, 3)),
        ("cuda", 1, 2, 7, (1,)),  # one GPU named: every worker shares it
        ("cuda:1", None, 2, 0, (1,)),
        ("CUDA:1", None, 2, None, (1,)),
    ],
)
def test_each_worker_gets_its_own_gpu(device, index, visible, rank, want) -> None:
    got = place(device, index, visible=visible, rank=rank)
    assert got == Placement("cuda", want)
    assert got.torch_device == f"cuda:{want[0]}"


def test_eight_workers_on_eight_gpus_use_all_of_them() -> None:
    assert sorted(place("cuda", None, visible=8, rank=r).indices[0] for r in range(8)) == list(range(8))


@pytest.mark.parametrize(
    ("device", "index", "visible", "message"),
    [
        ("cuda", [0, 2], 2, "beyond the 2 visible"),
        ("cuda", [1, 1], 2, "distinct"),
        ("cuda", [], 2, "non-empty list"),
        ("cuda", [0, -1], 2, "non-empty list"),
        ("cuda", None, 0, "no CUDA device"),
        ("cuda:0", 1, 2, "names its GPU"),
        ("tpu", None, 1, "device must be"),
        ("cuda:x", None, 1, "device must be"),
        ("cpu", 0, 1, "needs device = 'cuda'"),
        ("cpu:1", None, 1, "device must be"),
    ],
)
def test_bad_placements_fail_naming_the_problem(device, index, visible, message) -> None:
    with pytest.raises(ValueError, match=message):
        place(device, index, visible=visible)


def test_rank_from_env_then_dask(monkeypatch) -> None:
    monkeypatch.delenv(RANK_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert worker_rank() is None  # not in a Dask worker
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun's
    assert worker_rank() == 2
    monkeypatch.setenv(RANK_ENV, "3")  # ours wins
    assert worker_rank() == 3
    monkeypatch.setenv(RANK_ENV, "three")
    with pytest.raises(ValueError, match=RANK_ENV):
        worker_rank()


def test_rank_of_a_local_dask_worker(monkeypatch) -> None:
    """LocalCluster names its workers 0 … n-1; a task on worker r sees rank r."""
    from distributed import Client, LocalCluster

    monkeypatch.delenv(RANK_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        workers = sorted(client.scheduler_info()["workers"])
        ranks = {client.submit(worker_rank, workers=[w], pure=False).result() for w in workers}
    assert ranks == {0, 1}
