#!/usr/bin/env bash
# The checks that need a CUDA machine, in under 8 minutes; run whenever one is at hand and paste the
# output into the note. From the repo root:  bash bench/gpu_check.sh [tests] [speed] [fit]
# (no argument: all three). The datasets come from $TLPIPE_DATA (default ../shared/data; speed and fit
# read its bloodcells). Packages the machine lacks travel as wheels in .whl/ and are installed into
# $SITE, which stays while the machine does: the wheels (~65 MB) and bloodcells (~11 MB) pass the
# device tool's 64 MiB a call only apart, so a first call carries .whl and runs `tests`, the next
# carries the data and runs `speed fit` (see the device tool's README).
set -uo pipefail
export PYTHONUNBUFFERED=1
DATA=$(realpath -m "${TLPIPE_DATA:-../shared/data}")
SITE=/tmp/tlpipe-site
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d "$SITE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
phases=${*:-tests speed fit}
step() { echo; echo "== $1 ($(date +%T))"; }
step "device"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())" || exit 1
if [[ $phases == *tests* ]]; then
  step "CUDA tests: bf16 codes against the CPU's, a fine-tune under AMP, OOM halving under a reduced memory fraction"
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    "tests/test_tuning.py::test_cuda_out_of_memory_prunes_the_trial_and_the_study_goes_on"
fi
if [[ $phases == *speed* ]]; then
  step "extraction: tlpipe against the model alone"
  timeout 120 python3 bench/extract_throughput.py --data "$DATA/bloodcells" --max-images 512
  step "extraction with a worker a core (tlpipe's default is at most 4)"
  timeout 120 python3 bench/extract_throughput.py --data "$DATA/bloodcells" --max-images 1024 --workers "$(nproc)"
  step "training: tlpipe against a bare PyTorch loop"
  timeout 120 python3 bench/train_throughput.py --data "$DATA/bloodcells" --max-images 512 --epochs 3
fi
if [[ $phases == *fit* ]]; then
  step "tlpipe fit bloodcells --time-limit 3m"
  out=$(mktemp -d)
  start=$(date +%s)
  timeout 300 python3 -m tlpipe fit "$DATA/bloodcells" --time-limit 3m --output "$out/fit" \
    --tracking-uri "sqlite:///$out/mlflow.db" >"$out/log" 2>&1; echo "exit $? after $(( $(date +%s) - start )) s"
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('val_accuracy', s['val_accuracy'], 'strategy', s['strategy'], 'status', s['status']); print('plan', json.dumps(s.get('plan', {}).get('seconds'))); print('timings', s['timings'])" "$out/fit/summary.json" || tail -20 "$out/log"
  grep -iE "device|cuda|epoch" "$out/log" | head -8
fi
