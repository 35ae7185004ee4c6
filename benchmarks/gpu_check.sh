#!/usr/bin/env bash
# One call on a GPU machine: CUDA attention/encoder tests, then both benchmarks in bf16
# (N up to 100k, checkpointing on; batch 1/4/8 and CUDA-graph replays of the encoder step)
# then the encoder step in both LSE-gradient modes and a profile of one 8k step, with a
# summary table printed last. Fits in ~6 minutes (inner timeouts 100 s + 280 s).
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# Without CUDA it rehearses every step on the CPU at toy sizes.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DRY=""
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
  echo "== CUDA tests =="
  timeout 100 "$PY" -m pytest tests/models -q -k cuda -p no:cacheprovider -rs || echo "CUDA tests FAILED"
else
  DRY="--dry"
  echo "== no CUDA: rehearsal on CPU (CUDA tests are skipped) =="
  timeout 100 "$PY" -m pytest tests/models -q -k cuda -p no:cacheprovider -rs || echo "CUDA tests FAILED"
fi
timeout 280 "$PY" benchmarks/gpu_check.py $DRY || echo "gpu_check.py exited with $?"
