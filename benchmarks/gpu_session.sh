#!/usr/bin/env bash
# Everything one GPU check needs, in a single call of the device tool (the machine starts bare each time):
#   install kvfx (wheels carried in .whl/ for what the image lacks), run the GPU tests, the decode-attention
#   benchmarks (kvfx vs SDPA-GQA vs repeat_kv; eviction's scored decode over a 10-50% slot store vs SDPA-GQA over
#   the full cache), and the demo. Logs and JSON land in $OUT. Pass a pytest -k expression as $1 to select tests.
# Needs .assets/ (codelm-27m, stories260K, text/) and .whl/ carried with the call.
set -uo pipefail
export PYTHONUNBUFFERED=1 KVFX_ASSETS="$PWD/.assets"
OUT="${OUT:-/tmp/kvfx-out}"; mkdir -p "$OUT"; export KVFX_RESULTS_DIR="$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --find-links .whl --no-build-isolation -e . pytest hypothesis 2>&1 | tail -3
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 ${1:+-k "$1"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
python3 benchmarks/decode_eviction.py --budgets 0.1,0.2,0.3,0.5 2>&1 | tee "$OUT/bench_eviction.log" | tail -40
[ -n "${KVFX_DECODE_SWEEP:-}" ] && python3 benchmarks/decode_attention.py --sweep --out "$OUT/decode_attention.json" 2>&1 | tee "$OUT/bench.log" | tail -30
kvfx demo --prompt-tokens 2048 --new-tokens 256 --batch 4 2>&1 | tee "$OUT/demo.log" | grep -v "^kvfx: " | tail -8
kvfx demo --prompt-tokens 2048 --new-tokens 256 --batch 4 --spec examples/specs/h2o.yaml 2>&1 | tee "$OUT/demo_h2o.log" | grep -v "^kvfx: " | tail -8
