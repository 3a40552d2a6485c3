#!/usr/bin/env bash
# The GPU check, about 10 minutes on one NVIDIA GPU, on synthetic CIFAR-10 files (the checks are
# of speed and arithmetic, not accuracy). Writes its logs to ${OUT:-gpu-check}/ and prints:
#   1. the GPU tests (tests/test_gpu.py): a --deterministic run killed with SIGKILL and resumed
#      ends bit-identical to one done in one go (float32 and bf16); checkpoints load on the CPU;
#   2. bench.py's table (ResNet-20 and -56, ours in float32 and bf16 against the DataLoader
#      reference);
#   3. ResNet-56 for a few hundred iterations with run.py: float32/bf16, with and without
#      --compile, images per second of the last window;
#   4. a two-process torchrun, when there are two GPUs;
#   5. reproduce.py --jobs 1 against --jobs 3 on one GPU: what sharing a GPU gains.
# Usage: bash gpu_check.sh   (PYTHON=python3, ITERS=300, JOBS_ITERS=1000, STEP_TIMEOUT=240,
# DEVICE=cuda to change; DEVICE=cpu with tiny ITERS tries the script itself on a CPU)
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
ITERS=${ITERS:-300}
JOBS_ITERS=${JOBS_ITERS:-1000}
DEVICE=${DEVICE:-cuda}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
summary="$OUT/summary.txt"

step() {  # step NAME COMMAND...: run it with a time limit, log it, note how it ended
  local name=$1; shift
  echo "== $name: $*" | tee -a "$summary"
  timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  echo "   exit $code, $(tail -n 1 "$OUT/$name.log")" | tee -a "$summary"
}

last_speed() {  # the images per second of a run folder's last --log-every window
  "$PYTHON" -c "import sys, plot_curves; s = plot_curves.load_scalars(sys.argv[1]);
print(round(s['speed/images_per_second'][1][-1]))" "$1"
}

{ nvidia-smi -L; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
  date -u; git rev-parse HEAD 2>/dev/null; } | tee -a "$summary"
"$PYTHON" -c "import sys; sys.path.insert(0, 'tests'); import synthetic
synthetic.write_dataset(sys.argv[1])" "$work/cifar-10-batches-bin"
export CIFAR10_DIR="$work/cifar-10-batches-bin"

step gpu-tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
step bench "$PYTHON" bench.py --device "$DEVICE" --depths 20 56 --windows 3
grep '^|' "$OUT/bench.log" | tee -a "$summary"

for amp in none bf16; do
  for compile in "" --compile; do
    name="resnet56-$amp${compile:+-compile}"
    step "$name" "$PYTHON" run.py 9 train --device "$DEVICE" --amp "$amp" $compile --iters "$ITERS" \
      --log-every 100 --eval-every "$ITERS" --logdir "$work/logs" --name "$name"
    echo "   $name: $(last_speed "$work/logs/$name") img/s in the last window" | tee -a "$summary"
  done
done

if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step torchrun "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=2 run.py 9 \
    train --iters "$ITERS" --log-every 100 --eval-every "$ITERS" --logdir "$work/logs" \
    --name torchrun
  echo "   torchrun: $(last_speed "$work/logs/torchrun") img/s" | tee -a "$summary"
fi

for jobs in 1 3; do
  step "reproduce-jobs$jobs" "$PYTHON" reproduce.py --only resnet56 --seeds 3 --iters "$JOBS_ITERS" \
    --jobs "$jobs" --logdir "$work/jobs$jobs" --out "$work/out$jobs" -- --eval-every 1000
  "$PYTHON" -c "import glob, json, sys
speeds = [json.load(open(f))['images_per_second'] for f in glob.glob(sys.argv[1] + '/*/result.json')]
print(f'   --jobs {sys.argv[2]}: {len(speeds)} runs, img/s each', [round(s) for s in speeds],
      'mean', round(sum(speeds) / max(len(speeds), 1)), 'sum', round(sum(speeds)))" \
    "$work/jobs$jobs" "$jobs" | tee -a "$summary"
done
rm -rf "$work"
