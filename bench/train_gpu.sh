#!/usr/bin/env bash
# What the one-GPU performance issue needs from the GPU machine: bench/train.py on the
# 1B configs, in parts (each a few bench/train.py runs, each run with its own time limit):
#   short   seq 4096 x micro-batch 4: transformer-1b beside HF Llama eager (the anchor),
#           then hybrid-1b and sh2-1b; a profile trace of one step of each     (~300 s)
#   long    seq 16384 and 32768 x micro-batch 1: transformer-1b, hybrid-1b, sh2-1b (~300 s)
# Every run writes OUT/NAME.json and OUT/NAME.log; traces go to OUT/trace-NAME/. The demo
# corpus is prepared first (it needs zstandard on the machine: docs/gpu.md). Extra
# key=value overrides after the parts go to every run (e.g. parallel.compile=true).
#
#   STRIPES_COMMIT=<sha> bash bench/train_gpu.sh OUT [short,long] [key=value ...]
set -uo pipefail
OUT=${1:?usage: bash bench/train_gpu.sh OUT_DIR [short,long] [key=value ...]}
PARTS=",${2:-short,long},"
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA=("$@")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/stripes-triton-cache}
[ -d runs/data/demo ] || python3 -m stripes.launch.cli prepare configs/data/demo.yaml \
  > "$OUT/prepare.log" 2>&1 || { echo "prepare failed: $(tail -1 "$OUT/prepare.log")"; exit 1; }

# run NAME LIMIT_S ARGS...: bench/train.py ARGS with its report printed, within LIMIT_S.
# One GPU, one process: the single backend (what `parallel.backend: auto` picks there; the
# config's fsdp is for bench/train_vs_hf.sh's torchrun rows).
run() {
  local name=$1 limit=$2
  shift 2
  timeout -k 10 "$limit" python3 -W ignore bench/train.py --json "$OUT/$name.json" \
    parallel.backend=single "$@" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name (exit $rc)"
  if [ $rc -eq 0 ]; then grep -A4 "^stripes " "$OUT/$name.log"; else tail -3 "$OUT/$name.log"; fi
}

if [[ $PARTS == *,short,* ]]; then
  run transformer-4k 150 --hf --trace "$OUT/trace-transformer-4k"
  for arch in hybrid-1b sh2-1b; do
    run "$arch-4k" 150 arch=configs/arch/$arch.yaml --trace "$OUT/trace-$arch-4k"
  done
fi
if [[ $PARTS == *,long,* ]]; then
  for seq in 16384 32768; do
    for arch in transformer-1b hybrid-1b sh2-1b; do
      run "${arch%-1b}-$((seq / 1024))k" 100 arch=configs/arch/$arch.yaml data.seq_len=$seq \
        model.max_seq_len=$seq micro_batch=1 global_batch_tokens=$seq --steps 10 --warmup 3
    done
  done
fi
