#!/usr/bin/env bash
# End-to-end training benchmark on one GPU: `stripes train configs/train/bench-1b.yaml`
# (transformer-1b, seq 4096, micro-batch 4, bf16) under FSDP2 eager, FSDP2 compiled, FSDP2
# with selective activation checkpointing and the single backend, then the Hugging Face
# LlamaForCausalLM of the same shapes eager and compiled (bench/hf_llama_train.py), all in
# this one run. Results go to OUT:
#   NAME.log                 every run's output
#   NAME.metrics.jsonl       stripes runs: the trainer's metrics (tokens/s, MFU, memory)
#   NAME.json                HF runs: the timed steps
#   summary.md               the table, rewritten after every run
# A failed or timed-out run is reported in summary.md and the later runs still go. Each run
# has a time limit, and all of them share one deadline (BENCH_DEADLINE_S).
#
#   bash bench/train_vs_hf.sh OUT      (from the repository root, stripes installed)
set -uo pipefail  # no -e: a failed run must not stop the later ones

OUT=${1:?usage: bash bench/train_vs_hf.sh OUT_DIR}
CONFIG=configs/train/bench-1b.yaml
RUNS=runs/bench-1b  # each run's directory is deleted after it: a 1b checkpoint is ~10 GB
# Seconds from the start after which no run starts and each run's limit is cut to what is
# left: the whole script stays under 8 minutes, inside the machine's 10 per command.
DEADLINE=${BENCH_DEADLINE_S:-500}
NAMES=(stripes-fsdp stripes-fsdp-compiled stripes-fsdp-selective stripes-single hf-eager
       hf-compiled)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$SECONDS

say() { echo "[bench +$((SECONDS - START))s] $*"; }

summary() {
  python3 bench/hf_llama_train.py --summary "$OUT" "${NAMES[@]}" > /dev/null 2> "$OUT/summary.err" \
    || say "summary failed: $(tail -1 "$OUT/summary.err")"
}

# run NAME LIMIT_S COMMAND...: the command with its output in OUT/NAME.log, within LIMIT_S
# and the shared deadline; a failure is noted at the end of the log.
run() {
  local name=$1 limit=$2 left rc
  shift 2
  left=$((DEADLINE - (SECONDS - START)))
  if ((left < 30)); then
    echo "FAILED: skipped, ${left} s left before the deadline" > "$OUT/$name.log"
    say "FAILED $name: skipped (no time left)"
    return
  fi
  ((limit > left)) && limit=$left
  say "$name: start (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if ((rc == 0)); then
    say "$name: done"
    return
  fi
  local reason="exit status $rc"
  ((rc == 124 || rc == 137)) && reason="timed out after ${limit} s"
  echo "FAILED: $reason" >> "$OUT/$name.log"  # summary.md reads this line
  say "FAILED $name: $reason (see $name.log)"
}

# stripes_run NAME LIMIT_S LAUNCHER [key=value...]: train, keep metrics.jsonl, delete the run.
stripes_run() {
  local name=$1 limit=$2 launcher=$3 dir=$RUNS/$1
  shift 3
  local cli=(python3 -m stripes.launch.cli)
  [[ $launcher == torchrun ]] &&
    cli=(python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m stripes.launch.cli)
  rm -rf "$dir"  # a fresh run: metrics.jsonl is appended to, never replaced
  run "$name" "$limit" "${cli[@]}" train "$CONFIG" output_dir="$dir" "$@"
  [[ -f $dir/metrics.jsonl ]] && cp "$dir/metrics.jsonl" "$OUT/$name.metrics.jsonl"
  grep -E "^step " "$OUT/$name.log" | tail -2
  rm -rf "$dir"
  summary
}

hf_run() {
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" python3 bench/hf_llama_train.py --json "$OUT/$name.json" "$@"
  grep -E "^(parameters|HF Llama)" "$OUT/$name.log"
  summary
}

say "$(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1 | head -1)"
say "$(python3 -c 'import torch, transformers; print("torch", torch.__version__,
  "transformers", transformers.__version__)' 2>&1 | tail -1)"
say "preparing the demo corpus"
python3 -m stripes.launch.cli prepare configs/data/demo.yaml > "$OUT/prepare.log" 2>&1 \
  || say "FAILED prepare (see prepare.log); the stripes runs will fail"

stripes_run stripes-fsdp 120 torchrun
stripes_run stripes-fsdp-compiled 180 torchrun parallel.compile=true
stripes_run stripes-fsdp-selective 120 torchrun parallel.activation_checkpointing=selective
stripes_run stripes-single 120 python parallel.backend=single
hf_run hf-eager 90 --steps 20 --warmup 5
hf_run hf-compiled 180 --compile --steps 20 --warmup 5

rmdir "$RUNS" 2> /dev/null
say "all runs finished"
cat "$OUT/summary.md" 2>/dev/null || say "no summary.md (see $OUT/summary.err)"
