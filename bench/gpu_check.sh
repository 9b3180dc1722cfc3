#!/usr/bin/env bash
# The checks that need a CUDA machine, in under 8 minutes; run whenever one is at hand and paste the
# output into the note. From the repo root:  bash bench/gpu_check.sh
# Wheels the machine lacks may travel in .whl/ (see the device tool's README): installed to /tmp/site.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site:$PYTHONPATH"
fi
step() { echo; echo "== $1 ($(date +%T))"; }
step "device"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())" || exit 1
step "CUDA tests: AMP bf16, channels_last, OOM halving under a reduced memory fraction"
timeout 240 python3 -m pytest -q -x -k "cuda or oom or out_of_memory" tests/test_tuning.py tests/test_cli_more.py tests/test_memory.py tests/test_finetune.py
step "extraction: tlpipe against the model alone"
timeout 120 python3 bench/extract_throughput.py --max-images 512
step "training: tlpipe against a bare PyTorch loop"
timeout 120 python3 bench/train_throughput.py --max-images 512 --epochs 3
step "tlpipe fit bloodcells --time-limit 3m"
out=$(mktemp -d)
start=$(date +%s)
timeout 300 python3 -m tlpipe fit ../shared/data/bloodcells --time-limit 3m --output "$out/fit" \
  --tracking-uri "sqlite:///$out/mlflow.db" >"$out/log" 2>&1; echo "exit $? after $(( $(date +%s) - start )) s"
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('val_accuracy', s['val_accuracy'], 'strategy', s['strategy'], 'status', s['status']); print('plan', json.dumps(s.get('plan', {}).get('seconds')), s.get('plan', {}).get('train_size')); print('timings', s['timings'])" "$out/fit/summary.json" || tail -20 "$out/log"
