#!/usr/bin/env bash
# DeepSpeed ZeRO-2 and ZeRO-3 beside FSDP2 on one GPU, in one run: `stripes train
# configs/train/bench-1b.yaml` (seq 4096, micro-batch 4, bf16 autocast, plain causal) for
# transformer-1b and hybrid-1b, each backend in turn. Prints each run's last step records
# (tokens/s over the trainer's last <= 20 steps, MFU, peak memory) and writes the logs and
# metrics to OUT. Every run directory is deleted after its run (1B checkpoints are ~14 GB).
#
#   bash bench/deepspeed_gpu.sh OUT        (from the repository root, stripes installed)
set -u
OUT=${1:?usage: bash bench/deepspeed_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m stripes.launch.cli prepare configs/data/demo.yaml > "$OUT/prepare.log" 2>&1 || exit 1

# name:arch:steps:overrides
RUNS=(
  "transformer-fsdp:transformer-1b:30:parallel.backend=fsdp"
  "transformer-zero2:transformer-1b:60:parallel.backend=deepspeed parallel.deepspeed.zero_stage=2"
  "transformer-zero3:transformer-1b:60:parallel.backend=deepspeed parallel.deepspeed.zero_stage=3"
  "hybrid-fsdp:hybrid-1b:30:parallel.backend=fsdp"
  "hybrid-zero2:hybrid-1b:30:parallel.backend=deepspeed parallel.deepspeed.zero_stage=2"
  "hybrid-zero3:hybrid-1b:30:parallel.backend=deepspeed parallel.deepspeed.zero_stage=3"
)
for spec in "${RUNS[@]}"; do
  IFS=: read -r name arch steps overrides <<< "$spec"
  dir=runs/bench-ds/$name
  rm -rf "$dir"
  echo "== $name ($arch, $steps steps)"
  # shellcheck disable=SC2086  # overrides are separate words
  timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m stripes.launch.cli train configs/train/bench-1b.yaml arch=configs/arch/$arch.yaml \
    output_dir="$dir" steps="$steps" $overrides > "$OUT/$name.log" 2>&1 \
    || echo "FAILED (exit $?): $(grep -E 'Error|error' "$OUT/$name.log" | tail -1)"
  grep -E "^step" "$OUT/$name.log" | sed -n '1p;$p'
  cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2> /dev/null
  rm -rf "$dir"
done
