"""A DocLayout-YOLO checkpoint whose output depends on the page: the tiny recipe's random weights with
their BatchNorm statistics measured once (layout batching tests and ``benchmarks/layout_batch.py``).
Not a test module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def calibrated_doclayout_yolo(out_dir: Path, page: Image.Image, *, scale: str = "n") -> Path:
    """The recipe checkpoint (``build_random_doclayout_yolo``) with BatchNorm running statistics set by
    one train-mode pass over ``page`` and a noise image; returns the new ``.pt`` in ``out_dir``.

    As built, the recipe's head sees features of ~1e-7 (PyTorch's default init shrinks activations layer
    by layer and eval-mode BatchNorm does not rescale them): every page gets the same anchor-grid boxes
    at the same score, so comparing two ways of running the model would compare constants. Statistics
    measured on real activations keep them at unit scale; the weights are the recipe's.
    """
    import torch

    from tasks.recipes.doclayout_yolo_tiny import build_random_doclayout_yolo

    out_dir = Path(out_dir)
    built = build_random_doclayout_yolo(out_dir / "built", scale=scale)
    ckpt = torch.load(built, map_location="cpu", weights_only=False)  # our own file: unpickling is fine
    model = ckpt["model"].float()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the calibration batch
    x = (
        torch.from_numpy(np.array(page.convert("RGB").resize((480, 640)))).permute(2, 0, 1)[None].float()
        / 255
    )
    noise = torch.rand((1, 3, 640, 480), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()
        model(torch.cat([x, noise]))
    ckpt["model"] = model.eval().half()
    ckpt["m3dr"] = {**ckpt.get("m3dr", {}), "batchnorm": "calibrated on one page + noise"}
    out = out_dir / f"doclayout_yolo_calibrated_{scale}.pt"
    torch.serialization.save(ckpt, out)
    return out
