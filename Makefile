# `make test` and `make demo` set everything up on a fresh machine
# (scripts/setup_env.sh: venv with the pinned torch stack, ComfyUI 0.30.0).
SHELL := /bin/bash
ENV := .dtc/env

.PHONY: setup test demo bench bench-reference bench-fronts bench-peers gpu-bundle clean

setup:
	@bash scripts/setup_env.sh

test: setup
	@source $(ENV) && DTC_COMFYUI=$$DTC_COMFYUI DTC_COMFY_CLI=$$DTC_COMFY_CLI $$DTC_PYTHON -m pytest tests -q -p no:cacheprovider

demo: setup
	@source $(ENV) && DTC_COMFYUI=$$DTC_COMFYUI $$DTC_PYTHON scripts/demo.py

bench: setup
	@source $(ENV) && DTC_COMFYUI=$$DTC_COMFYUI $$DTC_PYTHON bench/bench_flux.py

bench-reference: setup
	@source $(ENV) && DTC_COMFYUI=$$DTC_COMFYUI $$DTC_PYTHON bench/bench_reference.py --out bench/out/reference

bench-fronts: setup
	@source $(ENV) && DTC_COMFYUI=$$DTC_COMFYUI $$DTC_PYTHON bench/bench_reference.py --fronts 28 50 20 --out bench/out/fronts

bench-peers: setup
	@source $(ENV) && $$DTC_PYTHON bench/bench_peers.py --out bench/out/peers --plot docs/peers_front.png

gpu-bundle: setup
	@source $(ENV) && $$DTC_PYTHON bench/gpu/make_bundle.py --comfyui $$DTC_COMFYUI

clean:
	rm -rf .dtc
