#!/usr/bin/env bash
# What issue 8 needs from the GPU machine, in parts:
#   tests    the mixer kernels' GPU tests                                      (limit 150 s)
#   kernels  bench/kernels.py for retention and ssd, beside fla and mamba_ssm     (240 s)
#   convs    bench/kernels.py for causal_conv and fft_conv, beside torch.compile  (240 s)
#   decode   bench/decode_step.py at 4k / 32k / 128k                              (120 s)
#   smoke    the trainer on the demo hybrid, one process / FSDP2 / compile        (240 s;
#            needs zstandard, docs/gpu.md)
# Pick parts so that one call stays under the machine's 10 minutes; a part's failure does
# not stop the next. The first call of fla's and mamba_ssm's kernels autotunes (compiling
# every config); pointing TRITON_CACHE_DIR at a carried folder, with
# TRITON_CACHE_AUTOTUNING=1, makes later calls skip that.
#
#   STRIPES_COMMIT=<sha> bash bench/mixer_kernels_gpu.sh OUT [tests,kernels,convs,decode,smoke]
set -uo pipefail
OUT=${1:?usage: bash bench/mixer_kernels_gpu.sh OUT_DIR [tests,kernels,convs,decode,smoke]}
PARTS=",${2:-tests,kernels,convs,decode,smoke},"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }
if [[ $PARTS == *,tests,* ]]; then
  timeout -k 10 150 python3 -m pytest -v -m gpu tests/gpu -p no:warnings --tb=short \
    -k "retention or ssd or causal_conv or fft_conv or step or mixers" 2>&1 | stamp \
    > "$OUT/gpu_tests.log"
  echo "gpu tests: exit ${PIPESTATUS[0]}"; grep -E "PASSED|FAILED|ERROR|passed|failed" \
    "$OUT/gpu_tests.log" | grep -v "PASSED" | tail -20
fi
if [[ $PARTS == *,kernels,* ]]; then
  timeout -k 10 240 python3 -W ignore bench/kernels.py --only retention,ssd \
    --out "$OUT/kernels" > "$OUT/kernels.log" 2>&1
  echo "bench/kernels.py retention,ssd: exit $?"; cat "$OUT/kernels/kernels.md" 2>/dev/null
fi
if [[ $PARTS == *,convs,* ]]; then
  timeout -k 10 240 python3 -W ignore bench/kernels.py --only causal_conv,fft_conv \
    --out "$OUT/convs" > "$OUT/convs.log" 2>&1
  echo "bench/kernels.py causal_conv,fft_conv: exit $?"; cat "$OUT/convs/kernels.md" 2>/dev/null
fi
if [[ $PARTS == *,decode,* ]]; then
  timeout -k 10 120 python3 -W ignore bench/decode_step.py --out "$OUT" > "$OUT/decode.log" 2>&1
  echo "bench/decode_step.py: exit $?"; cat "$OUT/decode_step.md" 2>/dev/null
fi
if [[ $PARTS == *,smoke,* ]]; then
  timeout -k 10 240 bash bench/gpu_train_smoke.sh > "$OUT/train_smoke.log" 2>&1
  echo "bench/gpu_train_smoke.sh: exit $?"; cat "$OUT/train_smoke.log"
fi
