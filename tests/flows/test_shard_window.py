"""The flow's shard window when a shard task fails: the jobs that need it are not run (even when their
other inputs succeed), the others finish, and the failure is reported by job."""

from __future__ import annotations

from prefect import flow, task


@task
def _job(name: str, fail: bool) -> dict:
    if fail:
        raise ConnectionError(f"{name}: server gone")
    return {"name": name, "skipped": False, "rows": 1, "seconds": 0.0}


@flow
def _window_flow(fail: str):
    from prefect import get_run_logger

    from flows.synthesize import ShardWindow

    window = ShardWindow(4, get_run_logger())

    def add(key, needs):
        window.add(key, needs, lambda: _job.submit(" ".join(key), key[1] == fail))

    add(("index", "train"), [])
    add(("index", "dev"), [])
    add(("queries", "g2"), [])
    for g in ("g1", "g2"):  # each train shard needs both indexes: one fails, the other succeeds
        add(("train", g), [("index", "train"), ("index", "dev")])
    results = window.run(key="window-test")
    return sorted(r["name"] for r in results), window.failures, sorted(window.blocked)


def test_a_failed_input_blocks_its_dependents_and_nothing_else(prefect_harness):
    done, failures, blocked = _window_flow("train")
    assert done == ["index dev", "queries g2"]
    assert (
        list(failures) == ["index train"]
        and "ConnectionError: index train: server gone" in failures["index train"]
    )
    assert blocked == ["train g1", "train g2"]


def test_without_failures_every_job_runs(prefect_harness):
    done, failures, blocked = _window_flow("nothing")
    assert done == ["index dev", "index train", "queries g2", "train g1", "train g2"]
    assert failures == {} and blocked == []
