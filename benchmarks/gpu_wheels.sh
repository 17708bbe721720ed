#!/usr/bin/env bash
# `make gpu-wheels`: the wheels a GPU machine without network needs to run ffdist (and
# `make gpu-check`), for its Python (3.12 by default: GPU_PY=3.11 for another), into
# wheels/gpu/. Versions are this venv's, so the GPU machine runs what the tests ran here.
# Copy the repository (wheels/gpu/ included) there; benchmarks/gpu_check.py installs from it
# with `pip install --no-index --no-deps --target .gpu-deps`.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
PY=${GPU_PY:-3.12}
OUT=${OUT:-wheels/gpu}
mkdir -p "$OUT"

version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pins=()
for pkg in omegaconf hjson pydantic pydantic-core annotated-types typing-inspection \
           typing-extensions py-cpuinfo; do
  v=$(version "$pkg")
  [ -n "$v" ] || { echo "gpu-wheels: $pkg is not installed in this venv" >&2; exit 2; }
  pins+=("$pkg==$v")
done
# binary wheels for the GPU machine's interpreter (pydantic-core is compiled)
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" "${pins[@]}"
# TorchCodec (data.decode=gpu decodes JPEGs with its nvjpeg path; without it ffdist uses
# torchvision's decode_jpeg). Its Linux wheels on PyPI carry the CUDA decoder; its
# compatibility table gives torch >= 2.11 from TorchCodec 0.12 on: TORCHCODEC='==0.16.0'
# pins one where the GPU machine's torch is older than the newest release needs.
# Optional: the other wheels are still written when it cannot be had.
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$OUT" "torchcodec${TORCHCODEC:->=0.16}" \
  || echo "gpu-wheels: no TorchCodec wheel for Python $PY; data.decode=gpu will use torchvision's decoder" >&2
# deepspeed is published as an sdist; built here without its ops it is pure Python
"$PIP" wheel --quiet --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"
ls -l "$OUT"
du -sh "$OUT"
