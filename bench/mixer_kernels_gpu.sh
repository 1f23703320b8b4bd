#!/usr/bin/env bash
# What issue 8 needs from the GPU machine: the mixer kernels' GPU tests ("tests"),
# bench/kernels.py for retention, ssd, causal_conv and fft_conv beside fla, mamba_ssm and
# torch.compile ("kernels"), bench/decode_step.py at 4k / 32k / 128k ("decode"), and the
# trainer's GPU smoke run on the demo hybrid, every new kernel under one process, FSDP2 and
# torch.compile ("smoke"; needs zstandard, docs/gpu.md). Each part has its own time limit
# (tests 150 s, kernels 240, decode 120, smoke 240): pick parts so that one call stays
# under the machine's 10 minutes. A part's failure does not stop the next.
#
#   STRIPES_COMMIT=<sha> bash bench/mixer_kernels_gpu.sh OUT [tests,kernels,decode,smoke]
set -uo pipefail
OUT=${1:?usage: bash bench/mixer_kernels_gpu.sh OUT_DIR [tests,kernels,decode,smoke]}
PARTS=",${2:-tests,kernels,decode,smoke},"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ $PARTS == *,tests,* ]]; then
  timeout -k 10 150 python3 -m pytest -q -m gpu tests/gpu -p no:warnings \
    -k "retention or ssd or causal_conv or fft_conv or step or mixers" > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
fi
if [[ $PARTS == *,kernels,* ]]; then
  timeout -k 10 240 python3 -W ignore bench/kernels.py --only retention,ssd,causal_conv,fft_conv \
    --out "$OUT" > "$OUT/kernels.log" 2>&1
  echo "bench/kernels.py: exit $?"; cat "$OUT/kernels.md" 2>/dev/null
fi
if [[ $PARTS == *,decode,* ]]; then
  timeout -k 10 120 python3 -W ignore bench/decode_step.py --out "$OUT" > "$OUT/decode.log" 2>&1
  echo "bench/decode_step.py: exit $?"; cat "$OUT/decode_step.md" 2>/dev/null
fi
if [[ $PARTS == *,smoke,* ]]; then
  timeout -k 10 240 bash bench/gpu_train_smoke.sh > "$OUT/train_smoke.log" 2>&1
  echo "bench/gpu_train_smoke.sh: exit $?"; cat "$OUT/train_smoke.log"
fi
