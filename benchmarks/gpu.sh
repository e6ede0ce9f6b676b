#!/usr/bin/env bash
# GPU figures of the trainer core: ours vs transformers on a ~1B Llama in bf16, with MFU (target >= 45% on one H100).
# Installs nothing: run it from the repository root in the project's environment (the train image or .venv).
#   benchmarks/gpu.sh            # uses .venv/bin/python when present, else python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
echo "== eager, both sides (apples to apples) =="
"$PY" benchmarks/train_step.py --preset gpu --rounds 1
echo "== ours with torch.compile per block (pretrain.compile=true) =="
"$PY" benchmarks/train_step.py --preset gpu --rounds 1 --compile
echo "== ours compiled, micro-batch 8 with full activation checkpointing =="
"$PY" benchmarks/train_step.py --preset gpu --rounds 1 --compile --batch 8 --ac full
