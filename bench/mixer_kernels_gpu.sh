#!/usr/bin/env bash
# What issue 8 needs from the GPU machine, in parts:
#   tests    the mixer kernels' and graph decoding's GPU tests but the anchors' (150 s)
#   anchors  the GPU tests against fla's and mamba_ssm's error                     (300 s)
#   kernels  bench/kernels.py for retention, ssd, gated_norm, beside fla, mamba_ssm (400 s)
#   sweep    bench/scalar_decay_sweep.py: launch settings of the retention/SSD kernels  (400 s)
#   convs    bench/kernels.py for causal_conv, fft_conv, toeplitz_conv, modal_filter and
#            modal_conv, beside plain PyTorch and torch.compile                    (400 s)
#   profile  bench/kernel_profile.py: per-launch CUDA time of the first case of retention,
#            ssd and modal_conv, stripes beside its anchor (after kernels, whose
#            autotuning it reuses; alone it pays fla's and mamba_ssm's again)     (120 s)
#   decode   bench/decode_step.py at 4k / 32k / 128k                              (120 s)
#   model    bench/decode_model.py: transformer-1b vs hybrid-1b, batch 1 and 64     (240 s)
#   smoke    the trainer on the demo hybrid, one process / FSDP2 / compile        (240 s;
#            needs zstandard, docs/gpu.md)
# Pick parts so that one call stays under the machine's 10 minutes; a part's failure does
# not stop the next. The first call of fla's and mamba_ssm's kernels at a new shape autotunes,
# compiling every config: 138 s for fla's chunk_retention and 95 s for mamba_ssm's
# mamba_chunk_scan_combined on an H200 (2026-12-02). The compiled kernels and the tuning are
# cached in one folder for the whole call, so a shape seen before costs nothing.
#
#   STRIPES_COMMIT=<sha> bash bench/mixer_kernels_gpu.sh OUT [tests,anchors,kernels,sweep,convs,profile,decode,model,smoke]
set -uo pipefail
OUT=${1:?usage: bash bench/mixer_kernels_gpu.sh OUT_DIR [tests,anchors,kernels,sweep,convs,profile,decode,model,smoke]}
PARTS=",${2:-tests,anchors,kernels,sweep,convs,profile,decode,model,smoke},"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/stripes-triton-cache}
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done; }
if [[ $PARTS == *,tests,* ]]; then
  timeout -k 10 150 python3 -m pytest -v -m gpu tests/gpu -p no:warnings --tb=short \
    -k "(retention or ssd or gated or causal_conv or fft_conv or toeplitz or modal or step or mixers or graph) and not as_close" \
    2>&1 | stamp > "$OUT/gpu_tests.log"
  echo "gpu tests: exit ${PIPESTATUS[0]}"; grep -E "FAILED|ERROR|passed|failed" \
    "$OUT/gpu_tests.log" | tail -20
fi
if [[ $PARTS == *,anchors,* ]]; then
  timeout -k 10 300 python3 -m pytest -v -m gpu tests/gpu -p no:warnings --tb=short \
    -k "as_close" 2>&1 | stamp > "$OUT/gpu_anchor_tests.log"
  echo "gpu anchor tests: exit ${PIPESTATUS[0]}"; grep -E "FAILED|ERROR|passed|failed" \
    "$OUT/gpu_anchor_tests.log" | tail -20
fi
if [[ $PARTS == *,kernels,* ]]; then
  timeout -k 10 400 python3 -W ignore bench/kernels.py --only retention,ssd,gated_norm \
    --out "$OUT/kernels" > "$OUT/kernels.log" 2>&1
  echo "bench/kernels.py retention,ssd,gated_norm: exit $?"; cat "$OUT/kernels/kernels.md" 2>/dev/null
fi
if [[ $PARTS == *,sweep,* ]]; then
  timeout -k 10 400 python3 -W ignore bench/scalar_decay_sweep.py --out "$OUT/sweep" \
    > "$OUT/sweep.log" 2>&1
  echo "bench/scalar_decay_sweep.py: exit $?"; cat "$OUT/sweep/scalar_decay_sweep.md" 2>/dev/null
fi
if [[ $PARTS == *,convs,* ]]; then
  timeout -k 10 400 python3 -W ignore bench/kernels.py \
    --only causal_conv,fft_conv,toeplitz_conv,modal_filter,modal_conv --out "$OUT/convs" \
    > "$OUT/convs.log" 2>&1
  echo "bench/kernels.py causal_conv,fft_conv,toeplitz_conv,modal_filter,modal_conv: exit $?"
  cat "$OUT/convs/kernels.md" 2>/dev/null
fi
if [[ $PARTS == *,profile,* ]]; then
  for kernel in retention ssd modal_conv; do
    timeout -k 10 40 python3 -W ignore bench/kernel_profile.py --only $kernel --case 0 \
      --out "$OUT/profile_$kernel" > "$OUT/profile_$kernel.log" 2>&1
    echo "bench/kernel_profile.py --only $kernel: exit $?"
    cat "$OUT/profile_$kernel/kernel_profile.md" 2>/dev/null
  done
fi
if [[ $PARTS == *,decode,* ]]; then
  timeout -k 10 120 python3 -W ignore bench/decode_step.py --out "$OUT" > "$OUT/decode.log" 2>&1
  echo "bench/decode_step.py: exit $?"; cat "$OUT/decode_step.md" 2>/dev/null
fi
if [[ $PARTS == *,model,* ]]; then
  timeout -k 10 240 python3 -W ignore bench/decode_model.py --out "$OUT" > "$OUT/decode_model.log" 2>&1
  echo "bench/decode_model.py: exit $?"; cat "$OUT/decode_model.md" 2>/dev/null
fi
if [[ $PARTS == *,smoke,* ]]; then
  timeout -k 10 240 bash bench/gpu_train_smoke.sh > "$OUT/train_smoke.log" 2>&1
  echo "bench/gpu_train_smoke.sh: exit $?"; cat "$OUT/train_smoke.log"
fi
