#!/usr/bin/env bash
# Install tesseract + the language packs of the 22 languages (Debian packages) for render QA
# (tasks/render/qa.py reads every rendered page back). Idempotent: does nothing when every pack is there.
set -euo pipefail
LANGS=(eng spa fra deu ita hin mar san kan tel tam mal chi_sim jpn kor ara ben guj ori pan rus tha)
missing=()
if command -v tesseract >/dev/null; then
  have=$(tesseract --list-langs 2>/dev/null | tail -n +2)
  for l in "${LANGS[@]}"; do grep -qx "$l" <<<"$have" || missing+=("$l"); done
else
  missing=("${LANGS[@]}")
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup_tesseract: tesseract $(tesseract --version 2>&1 | head -1 | cut -d' ' -f2) with all ${#LANGS[@]} language packs"
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
pkgs=(tesseract-ocr)
for l in "${missing[@]}"; do pkgs+=("tesseract-ocr-${l//_/-}"); done
echo "setup_tesseract: installing ${pkgs[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
tesseract --list-langs >/dev/null
