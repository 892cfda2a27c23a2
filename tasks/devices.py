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
    kind, _, suffix = device.strip().lower().partition(":")
    if kind == "cpu":
        if device_index is not None:
            raise ValueError(f"device_index {device_index!r} needs device 'cuda', not {device!r}")
        return Placement("cpu", (0,))
    if kind != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if suffix:
        if device_index is not None:
            raise ValueError(f"device {device!r} names its GPU: set device = 'cuda' to use device_index")
        if not suffix.isdigit():
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        indices: tuple[int, ...] = (int(suffix),)
    elif device_index is None:
        if visible is None:
            raise ValueError("device = 'cuda' without device_index needs the number of visible GPUs")
        indices = tuple(range(visible))
    elif isinstance(device_index, int):
        indices = (device_index,)
    else:
        indices = tuple(int(i) for i in device_index)
    if not indices:
        raise ValueError("no GPU to run on: device_index is empty or no CUDA device is visible")
    if len(set(indices)) != len(indices) or min(indices) < 0:
        raise ValueError(f"device_index must list distinct non-negative GPUs, got {list(indices)}")
    if visible is not None and max(indices) >= visible:
        raise ValueError(f"device_index {list(indices)} names a GPU beyond the {visible} visible")
    if rank is not None and len(indices) > 1:
        indices = (indices[rank % len(indices)],)
    return Placement("cuda", indices)
