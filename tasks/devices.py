"""Which accelerator an engine of this process runs on: one GPU per worker on a multi-GPU machine.

A stage engine (CTranslate2 translator, layout model) is loaded once per process. On a machine with
several GPUs and one Dask worker process per GPU, every worker used to load its engines on GPU 0. The
profile names the devices an engine may use (``device = "cuda"``, ``device_index = [0, 1, 2, 3]``, or
none: all visible GPUs); :func:`place` gives a worker of rank ``r`` the ``r``-th of them (round robin),
and a process that is not one of several workers (the thread runner, a script) all of them: CTranslate2
then keeps one model replica per GPU and spreads its batches across them.

The rank is ``M3DR_WORKER_RANK`` when set (a launcher that starts one process per GPU sets it), else
``LOCAL_RANK`` (torchrun's), else the Dask worker's name when it is an integer (``LocalCluster`` names its
workers 0 … n-1), else none.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

RANK_ENV = "M3DR_WORKER_RANK"


@dataclass(frozen=True)
class Placement:
    """An engine's device type (``"cpu"`` or ``"cuda"``) and the device indices it uses."""

    device: str
    indices: tuple[int, ...]

    @property
    def torch_device(self) -> str:
        """The device string of a single-device engine (torch): its first index."""
        return "cpu" if self.device == "cpu" else f"{self.device}:{self.indices[0]}"


def worker_rank() -> int | None:
    """This process's rank among the run's worker processes, or None when it is not one of several."""
    for var in (RANK_ENV, "LOCAL_RANK"):  # ours, then torchrun's (and most launchers')
        env = os.environ.get(var, "").strip()
        if env:
            if not env.isdigit():
                raise ValueError(f"{var} must be a non-negative integer, got {env!r}")
            return int(env)
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # no Dask, or not inside a Dask worker
        return None
    if isinstance(name, int):
        return name
    return int(name) if isinstance(name, str) and name.isdigit() else None


def check_devices(device: str, device_index: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """The GPUs a profile names, checked without looking at the machine (profile validation calls this,
    so a bad table fails on load naming its key): ``(N,)`` for ``cuda:N``, the ``device_index`` list
    for ``cuda``, None when the choice is left to the visible GPUs or the device is the CPU."""
    kind, _, suffix = str(device).strip().lower().partition(":")
    if kind not in ("cpu", "cuda") or (suffix and not suffix.isdigit()) or (kind == "cpu" and suffix):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device_index is not None and (kind == "cpu" or suffix):
        named = " (it names its GPU)" if suffix else ""
        raise ValueError(f"device_index needs device = 'cuda' (got device = {device!r}{named})")
    if suffix:
        return (int(suffix),)
    if device_index is None:
        return None
    indices = (device_index,) if isinstance(device_index, int) else tuple(int(i) for i in device_index)
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise ValueError(
            f"device_index must be a GPU number or a non-empty list of distinct ones, got {device_index!r}"
        )
    return indices


def place(
    device: str,
    device_index: int | Sequence[int] | None = None,
    *,
    visible: int | None = None,
    rank: int | None = None,
) -> Placement:
    """Where an engine runs: ``device`` (``cpu``, ``cuda`` or ``cuda:N``), the profile's ``device_index``
    (an int, a list, or None for every visible GPU), ``visible`` GPUs (None: not checked) and this
    worker's ``rank`` (None: use every listed GPU). A worker of rank r gets the r-th listed GPU (mod
    their number)."""
    named = check_devices(device, device_index)
    if str(device).strip().lower() == "cpu":
        return Placement("cpu", (0,))
    if named is None:
        if visible is None:
            raise ValueError("device = 'cuda' without device_index needs the number of visible GPUs")
        if visible < 1:
            raise ValueError("device = 'cuda' but no CUDA device is visible")
        named = tuple(range(visible))
    if visible is not None and max(named) >= visible:
        raise ValueError(f"device_index {list(named)} names a GPU beyond the {visible} visible")
    if rank is not None and len(named) > 1:
        named = (named[rank % len(named)],)
    return Placement("cuda", named)
