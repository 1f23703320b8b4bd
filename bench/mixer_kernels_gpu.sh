#!/usr/bin/env bash
# Everything issue 8 needs from the GPU machine, in one call: the mixer kernels' GPU tests,
# bench/kernels.py for retention, ssd, causal_conv and fft_conv (beside fla, mamba_ssm and
# torch.compile), bench/decode_step.py at 4k / 32k / 128k, and the trainer's GPU smoke run.
# Each part has its own time limit and the later parts run whatever happened before.
#
#   STRIPES_COMMIT=<sha> bash bench/mixer_kernels_gpu.sh OUT    (repository root, installed)
set -uo pipefail
OUT=${1:?usage: bash bench/mixer_kernels_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout -k 10 200 python3 -m pytest -q -m gpu tests/gpu -p no:warnings \
  -k "retention or ssd or causal_conv or fft_conv or step or mixers" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
timeout -k 10 240 python3 -W ignore bench/kernels.py --only retention,ssd,causal_conv,fft_conv \
  --out "$OUT" > "$OUT/kernels.log" 2>&1
echo "bench/kernels.py: exit $?"
timeout -k 10 120 python3 -W ignore bench/decode_step.py --out "$OUT" > "$OUT/decode.log" 2>&1
echo "bench/decode_step.py: exit $?"
# The trainer on the demo hybrid (every new kernel, packed documents): one process, FSDP2
# with block checkpointing, torch.compile. Needs zstandard (docs/gpu.md).
timeout -k 10 240 bash bench/gpu_train_smoke.sh > "$OUT/train_smoke.log" 2>&1
echo "bench/gpu_train_smoke.sh: exit $?"; cat "$OUT/train_smoke.log"
cat "$OUT/kernels.md" "$OUT/decode_step.md" 2>/dev/null
