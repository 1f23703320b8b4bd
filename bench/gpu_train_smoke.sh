#!/usr/bin/env bash
# Smoke run of the trainer on one GPU: the demo config unchanged (bf16), then FSDP2 under
# torchrun with block activation checkpointing, then torch.compile. Prints the last lines.
set -u
export PYTHONUNBUFFERED=1
python3 -m stripes.launch.cli prepare configs/data/demo.yaml > /dev/null || exit 1
for run in "single::" "fsdp:parallel.backend=fsdp parallel.activation_checkpointing=block:torchrun" \
           "compiled:parallel.compile=true:"; do
  IFS=: read -r name args launcher <<< "$run"
  echo "== $name"
  if [ -n "$launcher" ]; then
    cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m stripes.launch.cli)
  else
    cmd=(python3 -m stripes.launch.cli)
  fi
  "${cmd[@]}" train configs/train/demo.yaml output_dir=runs/gpu-$name steps=60 log_every=20 \
      schedule.warmup_steps=6 $args 2>&1 | grep -E "^step|stripes train|Error|error" | tail -5
done
