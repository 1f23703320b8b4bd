#!/usr/bin/env bash
# DeepSpeed ZeRO-2 and ZeRO-3 beside FSDP2 on one GPU, in one run: `stripes train
# configs/train/bench-1b.yaml` (seq 4096, micro-batch 4, bf16 autocast, plain causal) for
# transformer-1b and hybrid-1b, each backend in turn. hybrid-1b runs at micro-batch 2
# (accumulating 2) under every backend: at 4 it does not fit under ZeRO on an 80 GB GPU.
# Writes each run's log and metrics to OUT and prints bench/run_summary.py's table of the
# runs it made (steady-state tokens/s from step 50 on). Every run directory is deleted after
# its run (1B checkpoints are ~14 GB). Name runs to make only those (one 10-minute device
# call does not hold all six):
#
#   bash bench/deepspeed_gpu.sh OUT [RUN...]     (from the repository root, stripes installed)
set -u
OUT=${1:?usage: bash bench/deepspeed_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m stripes.launch.cli prepare configs/data/demo.yaml > "$OUT/prepare.log" 2>&1 || exit 1

# name:arch:steps:overrides
ZERO="parallel.backend=deepspeed parallel.deepspeed.zero_stage"
RUNS=(
  "transformer-fsdp:transformer-1b:300:parallel.backend=fsdp"
  "transformer-zero2:transformer-1b:300:$ZERO=2"
  "transformer-zero3:transformer-1b:300:$ZERO=3"
  "hybrid-fsdp:hybrid-1b:200:parallel.backend=fsdp micro_batch=2"
  "hybrid-zero2:hybrid-1b:200:$ZERO=2 micro_batch=2"
  "hybrid-zero3:hybrid-1b:200:$ZERO=3 micro_batch=2"
  # A precision control, not a backend: autocast over float32 weights like ZeRO, no FSDP2.
  "hybrid-single:hybrid-1b:200:parallel.backend=single micro_batch=2"
)
shift
made=()
for spec in "${RUNS[@]}"; do
  IFS=: read -r name arch steps overrides <<< "$spec"
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  dir=runs/bench-ds/$name
  rm -rf "$dir"
  echo "== $name ($arch, $steps steps)"
  # shellcheck disable=SC2086  # overrides are separate words
  timeout 500 python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m stripes.launch.cli train configs/train/bench-1b.yaml arch=configs/arch/$arch.yaml \
    output_dir="$dir" steps="$steps" $overrides > "$OUT/$name.log" 2>&1 \
    || echo "FAILED (exit $?): $(grep -E 'Error|error' "$OUT/$name.log" | tail -1)"
  cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2> /dev/null && made+=("$OUT/$name.metrics.jsonl")
  rm -rf "$dir"
done
[ ${#made[@]} -gt 0 ] && python3 bench/run_summary.py --skip 50 "${made[@]}"
