#!/usr/bin/env bash
# bench/train.py at several commits in one GPU call, so their tokens/s compare on one machine
# (a second call may land on another card). The GPU machine gets the working tree without
# .git, so the other commits travel as archives packed here:
#
#   bash bench/train_commits.sh pack SHA...            # here: .bench-trees/SHA.tar each
#   bash bench/train_commits.sh run OUT ARCH[,ARCH...] SHA|head ... [-- key=value ...]
#
# `run` (carry .bench-trees) installs each tree in turn (pip -e; `head` is the tree as sent,
# reported as $STRIPES_COMMIT) and runs bench/train.py on each ARCH (configs/arch/ARCH.yaml),
# 10 steps after 4, one process, each run within 200 s: OUT/SHA-ARCH.json and .log, and one
# report line each. The tree as sent is installed again at the end; runs/ (the prepared demo
# data) is shared by every tree.
set -uo pipefail
ROOT=$(pwd)
TREES=.bench-trees
case ${1:-} in
  pack)
    shift
    mkdir -p "$TREES"
    for sha in "$@"; do
      full=$(git rev-parse --short "$sha") || exit 1
      git archive -o "$TREES/$full.tar" "$full" && echo "$TREES/$full.tar"
    done
    exit 0 ;;
  run) ;;
  *) echo "usage: bash bench/train_commits.sh pack SHA... | run OUT ARCHS SHA|head ..." >&2
     exit 2 ;;
esac
OUT=${2:?run needs OUT}
ARCHS=${3:?run needs ARCH[,ARCH...]}
shift 3
COMMITS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do COMMITS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
EXTRA=("$@")
for sha in "${COMMITS[@]}"; do
  [ "$sha" = head ] || [ -f "$TREES/$sha.tar" ] || {
    echo "bench/train_commits.sh: no $TREES/$sha.tar; pack it here and carry $TREES" >&2
    exit 1; }
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d runs/data/demo ] || python3 -m stripes.launch.cli prepare configs/data/demo.yaml \
  > "$OUT/prepare.log" 2>&1 || { echo "prepare failed: $(tail -1 "$OUT/prepare.log")"; exit 1; }
for sha in "${COMMITS[@]}"; do
  if [ "$sha" = head ]; then
    dir=$ROOT label=${STRIPES_COMMIT:-head}
  else
    label=$sha
    dir=$ROOT/$TREES/$sha
    mkdir -p "$dir" && tar -xf "$TREES/$sha.tar" -C "$dir" && ln -sfn "$ROOT/runs" "$dir/runs"
  fi
  (cd "$dir" && python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1)
  for arch in ${ARCHS//,/ }; do
    name=$sha-$arch
    (cd "$dir" && STRIPES_COMMIT=$label timeout -k 10 200 \
      python3 -W ignore bench/train.py parallel.backend=single --steps 10 --warmup 4 \
      arch=configs/arch/$arch.yaml "${EXTRA[@]}" --json "$OUT/$name.json") > "$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name (exit $rc) $(grep -m1 '^stripes ' "$OUT/$name.log" || tail -1 "$OUT/$name.log")"
  done
done
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
