#!/usr/bin/env bash
# GPU readiness of pico-hf on one CUDA device, in at most 8 minutes (each step has its own time limit):
#   1. bf16 training at pico-decoder-small shapes: tokens/s and model FLOPs utilisation   (<= 150 s)
#   2. sdpa vs eager vs flash-attention-2 (when installed) logits parity in bf16           (<= 60 s)
#   3. cached greedy decoding, pico-decoder vs its LlamaForCausalLM conversion, bf16      (<= 60 s)
#   4. the demo (recipes/configs/demo.yaml) trained on the GPU, with its evaluation and
#      learning dynamics at every checkpoint                                               (<= 180 s)
# Results go to stdout (one JSON line per check) and to $OUT_DIR (default gpu_check/), with the logs.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the environment of `make setup`
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
OUT_DIR=${OUT_DIR:-gpu_check}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
status=0

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PYTHON" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt"

run() {  # run <name> <seconds> <command...>: one check, its output kept, a failure noted and the others still run
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    if timeout "$limit" "$@" > "$OUT_DIR/$name.json" 2> "$OUT_DIR/$name.log"; then
        cat "$OUT_DIR/$name.json"
    else
        echo "{\"check\": \"$name\", \"failed\": \"exit $?\", \"log\": \"$OUT_DIR/$name.log\"}"
        tail -n 5 "$OUT_DIR/$name.log" >&2
        status=1
    fi
    echo "  ($name: $((SECONDS - start)) s)" >&2
}

run train 150 "$PYTHON" benchmarks/gpu_check.py train --steps 30 --batch 8
run attention 60 "$PYTHON" benchmarks/gpu_check.py attention
run decode 60 "$PYTHON" benchmarks/gpu_check.py decode

# The demo on the GPU: the README's main job, bf16 mixed precision, everything else as on CPU.
demo_start=$SECONDS
if timeout 180 "$PYTHON" recipes/train.py --config recipes/configs/demo.yaml \
        training.fabric.accelerator=cuda training.fabric.precision=bf16-mixed \
        "checkpointing.runs_dir=$OUT_DIR/runs" > "$OUT_DIR/demo.log" 2>&1; then
    seconds=$((SECONDS - demo_start))
    "$PYTHON" - "$OUT_DIR/runs/pico-decoder-demo" "$seconds" <<'EOF'
import json, sys
from pathlib import Path
run, seconds = Path(sys.argv[1]), int(sys.argv[2])
results = {p.stem: json.loads(p.read_text()) for p in sorted((run / "eval_results").glob("step_*.json"))}
checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
print(json.dumps({"check": "demo", "seconds": seconds, "checkpoints": checkpoints, "eval_results": results}))
EOF
else
    echo "{\"check\": \"demo\", \"failed\": \"exit $?\", \"log\": \"$OUT_DIR/demo.log\"}"
    tail -n 5 "$OUT_DIR/demo.log" >&2
    status=1
fi
echo "  (demo: $((SECONDS - demo_start)) s; total: $SECONDS s)" >&2
exit $status
