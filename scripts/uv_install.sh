#!/usr/bin/env bash
# Install packages into a virtualenv with uv (PyPI's `uv`), from the package sources pip is configured
# with on this machine (its find-links, extra index URLs and constraint file), so the same wheels come
# from local disk that pip would take (torch 2.14.1 + torchvision 0.29.1 here).
#
#   scripts/uv_install.sh VENV [uv pip install arguments…]
#
# Why uv: installing the ~6 GB torch + CUDA wheels and ~200 packages takes pip ~2 min per fresh venv;
# uv links them from its cache (~/.cache/uv) in seconds, so a second clone on the same machine sets up
# in well under a minute. The first run costs what pip costs. uv itself is bootstrapped with the venv's
# own pip (one small wheel, cached by pip).
#
# --compile-bytecode: pip compiles .pyc at install and uv does not; where PYTHONDONTWRITEBYTECODE is set
# (seen on this machine kind) nothing writes them later, and every process that imports torch +
# transformers compiles them in memory again: `import transformers` + a model class 10.9 s -> 4.7 s.
#
# --index-strategy unsafe-best-match: pip's rule (best version across every index). uv's default takes
# every version of a package from the first index that has any, which would pin e.g. numpy to the few
# versions a local extra index holds.
set -euo pipefail
venv="$1"
shift
uv="$venv/bin/uv"
if [[ ! -x "$uv" ]]; then
  "$venv/bin/python" -m pip install -q uv 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
fi
args=(--python "$venv/bin/python" --index-strategy unsafe-best-match --compile-bytecode)
# pip's sources: config files and PIP_* variables (both may be set; duplicates are harmless)
for url in $(pip config get global.extra-index-url 2>/dev/null || true) ${PIP_EXTRA_INDEX_URL:-}; do
  [[ "$url" != file://* || -e "${url#file://}" ]] && args+=(--extra-index-url "$url")
done
for dir in $(pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
  [[ -e "${dir#file://}" ]] && args+=(--find-links "$dir")
done
for file in $(pip config get global.constraint 2>/dev/null || true) ${PIP_CONSTRAINT:-}; do
  [[ -f "$file" ]] && args+=(--constraint "$file")
done
exec "$uv" pip install -q "${args[@]}" "$@"
