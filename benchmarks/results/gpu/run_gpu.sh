#!/usr/bin/env bash
# The whole GPU call of issue 7 (deliverable 2), run from the repository root on the device:
#   1. pydantic from the carried wheels (the GPU box has torch but no pydantic, no network);
#   2. CIFAR-10 limited data (jobs/cifar10_limited.yaml: 25 images/class, VGG9-bn target,
#      TinyImageNet ResNet32 source taps 4,9,14, 200 epochs, batch 128), METHODS x SEEDS as
#      parallel one-process runs (--backend local, colocated source) on the one GPU;
#   3. benchmarks/gpu_throughput.py in what time is left (nothing else on the GPU by then).
# Needs gpu_carry/ (wheels/, cifar10-jpeg/, the .pth.tar) carried with the working tree.
# Writes to $OUT: log.txt, train_results.tar.gz (metrics.jsonl, job.yaml, summaries, stderr;
# no checkpoints), gpu_throughput.json.
set -u
START=$SECONDS
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"l2t_ww fm scratch"}
TRAIN_LIMIT=${TRAIN_LIMIT:-330}   # seconds per training process
TOTAL_LIMIT=${TOTAL_LIMIT:-575}   # the benchmark gets what is left of this
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-1}
TRAIN=${TRAIN:-1}
BENCH=${BENCH:-1}
BENCH_ARGS=${BENCH_ARGS:-}
EXTRA=${EXTRA:-}                  # more key=value overrides (smoke tests: optim.epochs=1 ...)
PY=${PY:-python3}
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ -d gpu_carry/wheels ] && ! $PY -c "import pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pydeps gpu_carry/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/pydeps:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
$PY -c "import sys, torch, pydantic, typing_extensions as te; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pydantic', pydantic.VERSION, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
nproc

if [ "$TRAIN" = 1 ]; then
  RUNS=/dev/shm/l2t_runs
  mkdir -p $RUNS 2>/dev/null && touch $RUNS/.w 2>/dev/null || { RUNS=/tmp/l2t_runs; mkdir -p $RUNS; }
  echo "runs in $RUNS; $(date)"
  CKPT=gpu_carry/l2tww_tinyimagenet200_resnet32_model_best.pth.tar
  PIDS=()
  for m in $METHODS; do for s in $SEEDS; do
    name=${m}_s$s
    timeout $TRAIN_LIMIT $PY -m l2t_dist.cli train jobs/cifar10_limited.yaml data.path=gpu_carry/cifar10-jpeg \
      sources.0.checkpoint=$CKPT run.device=$DEVICE run.out_dir=$RUNS run.name=$name run.seed=$s \
      method.name=$m run.threads=$THREADS $EXTRA --quiet --json >$RUNS/$name.summary.json 2>$RUNS/$name.stderr &
    PIDS+=($!)
  done; done
  ( while sleep 30; do echo "t=$((SECONDS-START))s epochs done: $(for f in $RUNS/*/metrics.jsonl; do [ -f $f ] && echo -n "$(basename $(dirname $f))=$(wc -l <$f) "; done)"; done ) &
  MON=$!
  wait "${PIDS[@]}"
  kill $MON 2>/dev/null
  echo "training done at t=$((SECONDS-START))s"
  for f in $RUNS/*.stderr; do [ -s $f ] && { echo "== $f"; tail -5 $f; }; done
  $PY benchmarks/results/gpu/summarize.py $RUNS
  tar czf "$OUT/train_results.tar.gz" -C $RUNS --exclude='*.pt' --exclude='.w' . && ls -la "$OUT"
fi

if [ "$BENCH" = 1 ]; then
  REM=$(( TOTAL_LIMIT - (SECONDS - START) ))
  echo "benchmark with ${REM}s left"
  [ $REM -gt 20 ] && timeout $REM $PY benchmarks/gpu_throughput.py --device $DEVICE --json "$OUT/gpu_throughput.json" $BENCH_ARGS
fi
echo "all done at t=$((SECONDS-START))s"
