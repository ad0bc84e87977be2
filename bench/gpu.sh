#!/usr/bin/env bash
# The GPU benchmarks on one H100 / H200, offline, in under 8 minutes: randomly initialised models of real
# shapes, bf16, each part under its own time limit. Results (JSON + logs) go to the folder given.
#
#   bash bench/gpu.sh bench/results/h100        # needs requirements/cuda.txt + requirements/bench.txt
#   SMALL=1 bash bench/gpu.sh /tmp/gpu_check    # toy shapes: checks the script itself, on a CPU too
#
# 1. ranking: rank.py vs llm-blender's Blender.rank (batch_size=1 as the released SPPO code, and its best),
#    PairRM's real shape (DeBERTa-v3-large backbone, 24 layers, 435M parameters), 64 prompts x K=5.
# 2. training: train_sppo.py vs TRL DPOTrainer sppo_hard (ref model held / precomputed), a narrow policy (2 layers,
#    width 128) at the recipes' vocabularies 32,000 and 128,256, 64 pairs of 20-800 token responses.
# 3. generation: generate.py's vLLM engine vs its HF engine, the same 1B policy, 64 prompts x K=5.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu.sh RESULTS_DIR}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 SPPO_PROGRESS=0
if [ -n "${SMALL:-}" ]; then   # toy shapes, a few seconds each
    RANKER=tiny; POLICY=tiny; VOCAB=600; N=8; GEN_TOKENS=32; DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
else
    RANKER=pairrm; POLICY=1b; VOCAB=128256; N=64; GEN_TOKENS=256; DEV=cuda
fi
START=$SECONDS
status=0
part() {  # part NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -i -E "warn|it/s\]" "$OUT/$name.log" | tail -n 12
    if (( rc != 0 )); then echo "== $name FAILED (exit $rc; 124 = over its time limit): see $OUT/$name.log"; status=1; fi
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"; } > "$OUT/device.txt"
echo "device: $(cat "$OUT/device.txt")"

part rank 170 "$PY" bench/bench_rank.py --ranker "$RANKER" --device "$DEV" --n-prompts "$N" --repeats 2 \
    --sweep 1,4,16 --our-sweep 16,32,64,128 --blender-fp16 --threads 0 --out "$OUT/rank.json"

part train 170 "$PY" bench/bench_train.py --model narrow --vocab-sizes "$([ -n "${SMALL:-}" ] && echo 600 || echo 32000,128256)" \
    --n-prompts "$N" --max-tokens "$([ -n "${SMALL:-}" ] && echo 100 || echo 800)" --batch-size 16 --micro-batch-size 4 \
    --threads 0 --out "$OUT/train.json"

# generation needs the policy on disk and a prompt file: the same random 1B shape, the tiny world's vocabulary
# (sampled ids must decode), and toy prompts
GEN=$(mktemp -d)
part gen_setup 60 "$PY" -c "
import sys; sys.path.insert(0, 'bench')
import json, random, bench_train, world
bench_train.random_policy('$GEN/policy', '$POLICY')
with open('$GEN/prompts.jsonl', 'w') as f:
    for i, p in enumerate(world.make_prompts(random.Random(0), $N)):
        f.write(json.dumps({'id': f'g{i}', 'prompt': p}) + '\n')"
part generate 180 "$PY" bench/bench_generate.py --model "$GEN/policy" --prompts "$GEN/prompts.jsonl" \
    --n-prompts "$N" --k 5 --max-tokens "$GEN_TOKENS" --out "$OUT/generate.json" \
    --extra="$([ "$DEV" = cuda ] || echo "--kv-cache-gb 0.25")"
rm -rf "$GEN"
echo "gpu.sh: $(( SECONDS - START ))s in all; results in $OUT"
exit $status
