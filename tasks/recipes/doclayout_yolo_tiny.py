"""Recipe ``doclayout-yolo-tiny``: DocLayout-YOLO with random weights from the package's own config.

It tests our load → predict → parse path of the ``doclayout-yolo`` layout engine without the hub
checkpoint (the real DocStructBench weights are the ``full`` profile's).
"""

from __future__ import annotations

import copy
from pathlib import Path

from tasks.ingest.layout import DOCSTRUCTBENCH_CLASSES


def doclayout_yaml() -> Path:
    """The DocLayout-YOLO architecture file shipped inside the installed doclayout_yolo package."""
    import doclayout_yolo

    path = Path(doclayout_yolo.__file__).parent / "cfg" / "models" / "v10" / "yolov10m-doclayout.yaml"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def build_random_doclayout_yolo(out_dir: Path, *, scale: str = "n", seed: int = 0) -> Path:
    """Build a random-weight DocLayout-YOLO checkpoint loadable by ``YOLOv10(path)``; return its path.

    Architecture: the package's own ``yolov10m-doclayout.yaml`` (G2L_CRM blocks of DocLayout-YOLO). That
    yaml only defines scale ``m`` (19.5 M params); other scales take their [depth, width, max_channels]
    from the package's ``yolov10{scale}.yaml`` (``n``: 2.0 M params, ~4× faster on CPU), so the tiny
    profile tests the same code path quickly. ``model.names`` carries the 10 DocStructBench classes.
    ``YOLOv10(yaml).save()`` fails for YAML-built models, so the checkpoint dict is written with
    ``torch.save`` in the layout the loader reads (``model`` = the half-precision module, as the
    official checkpoints store it, plus ``train_args``). The global torch RNG is left untouched.
    """
    import doclayout_yolo
    import torch
    from doclayout_yolo.nn.tasks import YOLOv10DetectionModel, yaml_model_load
    from doclayout_yolo.utils import yaml_load

    cfg = copy.deepcopy(yaml_model_load(doclayout_yaml()))
    if scale not in cfg["scales"]:
        other = doclayout_yaml().with_name(f"yolov10{scale}.yaml")
        if not other.is_file():
            raise ValueError(f"no YOLOv10 scale {scale!r} in doclayout_yolo (looked for {other.name})")
        cfg["scales"] = {**cfg["scales"], scale: yaml_load(other)["scales"][scale]}
    cfg["scale"] = scale
    cfg["nc"] = len(DOCSTRUCTBENCH_CLASSES)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a one-off build: 0.2 s on one thread, seconds when threads compete
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = YOLOv10DetectionModel(cfg, verbose=False)
    finally:
        torch.set_num_threads(threads)
    model.names = dict(enumerate(DOCSTRUCTBENCH_CLASSES))
    model.eval()
    ckpt = {
        "model": copy.deepcopy(model).half(),
        "train_args": {"task": "detect", "imgsz": 1024, "model": doclayout_yaml().name},
        "date": None,
        "version": getattr(doclayout_yolo, "__version__", ""),
        "m3dr": {"recipe": "random DocLayout-YOLO", "scale": scale, "seed": seed},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"doclayout_yolo_random_{scale}.pt"
    tmp = path.with_suffix(".pt.tmp")
    # plain pickle via torch.serialization.save: importing doclayout_yolo rebinds the global torch.save to a
    # dill-based wrapper; the checkpoint should not depend on dill to be read back
    torch.serialization.save(ckpt, tmp)
    tmp.replace(path)
    return path


def build(out_dir: Path) -> Path:
    """Recipe builder: the random checkpoint (scale ``n``, seed 0) in ``out_dir``."""
    build_random_doclayout_yolo(Path(out_dir))
    return Path(out_dir)
