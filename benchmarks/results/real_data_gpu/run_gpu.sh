#!/usr/bin/env bash
# Issue 7: the CPU study's remaining rows (benchmarks/real_data_study.py, the same commands and
# budget: 20 epochs, batch 32) run on a lent GPU box, many at once, plus a few rows that were
# also run on the CPU, to show how far CPU and GPU runs of one command agree.
# Run from the repository root on the device with gpu_carry/ carried (docs/results.md, "On a GPU box").
# The result JSONs already in benchmarks/results/real_data_gpu/ are copied in first, so their runs
# are skipped. Writes to $OUT (few files: the device tool returns only a handful): log.txt,
# real_data.tar.gz (every result JSON, old and new), runs.tar.gz (metrics.jsonl of every run,
# finished or not; no checkpoints).
set -u
START=$SECONDS
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
PARALLEL=${PARALLEL:-14}
LIMIT=${LIMIT:-480}          # seconds for the whole study part (then whatever finished comes back)
ONLY=${ONLY:-"c10-25 c10-50 c10-100 ms- c10src"}
SEEDS=${SEEDS:-"0 1 2"}
SET=${SET:-"run.threads=1"}
exec > >(tee -a "$OUT/log.txt") 2>&1

if ! $PY -c "import pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links gpu_carry/wheels --no-compile --no-cache-dir --target /tmp/pydeps pydantic || exit 1
  export PYTHONPATH=/tmp/pydeps:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
$PY -c "import sys, torch, pydantic, pyarrow; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pydantic', pydantic.VERSION, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || { echo "missing a dependency (pyarrow reads the CIFAR-10 Parquet copy)"; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
nproc

RES=/tmp/l2t_results; mkdir -p $RES; cp benchmarks/results/real_data_gpu/*.json $RES/ 2>/dev/null
RUNS=/dev/shm/l2t_study
mkdir -p $RUNS 2>/dev/null && touch $RUNS/.w 2>/dev/null || { RUNS=/tmp/l2t_study; mkdir -p $RUNS; }
( while sleep 30; do echo "t=$((SECONDS-START))s epochs: $(for f in $RUNS/*/metrics.jsonl; do [ -f $f ] && echo -n "$(basename $(dirname $f))=$(wc -l <$f) "; done)"; done ) &
MON=$!
timeout $LIMIT $PY benchmarks/real_data_study.py --device cuda --shared gpu_carry --parallel $PARALLEL \
  --timeout $((LIMIT - 10)) --results $RES --out-dir $RUNS --set $SET --only $ONLY --seeds $SEEDS
echo "study exit $? at t=$((SECONDS-START))s"
kill $MON 2>/dev/null
tar czf "$OUT/runs.tar.gz" -C $RUNS --exclude='*.pt' --exclude='.w' . ; tar czf "$OUT/real_data.tar.gz" -C $RES .
ls -la "$OUT"; ls $RES | wc -l
echo "all done at t=$((SECONDS-START))s"
