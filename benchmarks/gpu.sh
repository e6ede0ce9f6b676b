#!/usr/bin/env bash
# GPU figures of the trainer core: ours compiled against transformers compiled (the same blocks, fused AdamW,
# use_cache=False, bf16 autocast), on a ~1B Llama in bf16, one line per variant with tokens/s and MFU against the
# card's data-sheet bf16 peak (H100/H200: 989 TFLOP/s) and against its measured GEMM peak; the last line is the ratio.
# Then rollout tokens/s on the same model: our generation path against transformers' generate (KV cache, sampling at
# temperature 1.0 / top-p 0.9, bf16, neither compiled; benchmarks/rollout.py).
# Last, the document-mask check (scripts/check_attention.py): SFT's packed path builds a FlexAttention block mask,
# not a dense T x T mask, and matches the dense path, 4096 tokens of 8 documents; it fails the script otherwise.
# Installs nothing: run it from the repository root in the project's environment (the train image or .venv).
# About 5 minutes on one H200, most of it compiling, plus the mask check's own compile (not yet timed on a device).
#   benchmarks/gpu.sh            # on a GPU machine
#   benchmarks/gpu.sh --smoke    # anywhere: the tiny model, a few steps and one short rollout, on whatever device
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || echo python )}
if [ "${1:-}" = "--smoke" ]; then
  "$PY" benchmarks/train_step.py --preset tiny --compile --rounds 1 --steps 2 --warmup 1
  exec "$PY" benchmarks/rollout.py --preset tiny --rounds 1 --calls 1 --new 8
fi
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible (benchmarks/gpu.sh --smoke runs without one)"
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF
"$PY" benchmarks/train_step.py --preset gpu --compile --rounds 1
"$PY" benchmarks/rollout.py --preset gpu --rounds 2
"$PY" scripts/check_attention.py --check
