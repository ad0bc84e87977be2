#!/usr/bin/env bash
# SPPO, the whole loop: for t = 1..ITERS, sample K responses per prompt from pi_t (generate.py), score
# every pair with PairRM (rank.py), and train pi_{t+1} against pi_t as reference (train_sppo.py).
#
# usage: bash run_loop.sh CONFIG      (CONFIG: one of configs/*.env; any of its variables can come from the environment)
#
#   bash run_loop.sh configs/tiny.env                       # the CPU demo (make demo)
#   bash run_loop.sh configs/mistral7b.env                  # the released recipe on one 8-GPU box
#   CUDA_VISIBLE_DEVICES=4,5,6,7 GPUS=4 N_PROMPTS=500 bash run_loop.sh configs/mistral7b.env   # 4 GPUs, 500 prompts
#   GPUS=8 sbatch -N 2 --gres=gpu:8 examples/slurm/sppo.sbatch configs/mistral7b.env   # 2 nodes (docs/cluster.md)
#
# Every stage writes its output under a temporary name and renames it when complete, so a rerun skips
# what is finished and resumes what is not. Logs: $OUT/iterT/logs/STAGE.log (sharded stages: STAGE.s.log).
# Every variable, its default and the flag it feeds: docs/configuration.md.
set -euo pipefail
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
case "${1-}" in  # no config: the usage (on stderr), never the 7B recipe by default
    -h|--help) usage; exit 2 ;;
    "") usage >&2; exit 2 ;;
esac
(( $# == 1 )) || { echo "run_loop: one argument, the config; got $#: $*" >&2; exit 2; }
cd "$(dirname "$0")"
CONFIG=$1
[ -f "$CONFIG" ] || { echo "run_loop: no config file $CONFIG" >&2; exit 2; }
source "$CONFIG"   # a config sets VAR=${VAR:-default}, so the environment wins
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-0}                     # 0: everything on the CPU, one process
NPROC=$(( GPUS > 0 ? GPUS : 1 ))    # processes per stage: one per GPU
# The GPUs: the first GPUS of the user's CUDA_VISIBLE_DEVICES (physical ids or UUIDs), else 0..GPUS-1.
# Shard s runs on DEVICES[s]; training on all of them.
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then IFS=, read -ra DEVICES <<< "$CUDA_VISIBLE_DEVICES"  # "" hides all
else DEVICES=(); for ((s = 0; s < GPUS; s++)); do DEVICES+=("$s"); done; fi
if (( GPUS > ${#DEVICES[@]} )); then
    echo "run_loop: GPUS=$GPUS but CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' names ${#DEVICES[@]} devices" >&2; exit 2
fi
DEVICES=("${DEVICES[@]:0:GPUS}")
TRAIN_DEVICES=$(IFS=,; echo "${DEVICES[*]}")
# TP: GPUs per generation engine (vLLM tensor parallelism, for a model larger than one GPU); ranking keeps one.
TP=${TP:-1}
if (( TP > 1 && (GPUS == 0 || GPUS % TP) )); then echo "run_loop: TP=$TP needs GPUS a multiple of it (GPUS=$GPUS)" >&2; exit 2; fi
TP_ARGS=(); if (( TP > 1 )); then TP_ARGS=(--tensor-parallel-size "$TP"); fi
# BATCH_INVARIANT=1: vLLM's batch-invariant mode in generation (VLLM_BATCH_INVARIANT=1), so that on a GPU a response
# depends only on its prompt and seed, not on the batch it was sampled in (docs/hardware.md); slower decoding.
BATCH_INVARIANT=${BATCH_INVARIANT:-0}
case $BATCH_INVARIANT in
    0) GEN_ENV=() ;;
    1) GEN_ENV=(env VLLM_BATCH_INVARIANT=1) ;;
    *) echo "run_loop: BATCH_INVARIANT=$BATCH_INVARIANT: expected 0 or 1" >&2; exit 2 ;;
esac
# Inside a SLURM allocation (sbatch, salloc) every stage runs on all its nodes, GPUS per node, started with
# srun (docs/cluster.md); the nodes must share OUT's filesystem. Outside one, NODES is empty: one machine.
NODES=()
if [ -n "${SLURM_JOB_ID-}" ] && [ "${SLURM:-1}" != 0 ]; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    (( ${#NODES[@]} )) || { echo "run_loop: SLURM job $SLURM_JOB_ID: no nodes in SLURM_JOB_NODELIST" >&2; exit 2; }
fi
# A job given GPUs by SLURM (--gres=gpu:N, --gpus-per-node) has SLURM place them: each job step asks for its own
# GPUs and CPUs (--exact) and sees only those, numbered from 0. Without (a cluster that does not manage its GPUs
# as resources, or a CPU one) the steps overlap and the loop pins each to its devices itself.
SLURM_GPUS=0
if (( ${#NODES[@]} && GPUS > 0 )) && [ -n "${SLURM_JOB_GPUS-}${SLURM_GPUS_ON_NODE-}" ]; then SLURM_GPUS=1; fi

# --- settings guard: a run directory holds one experiment; changing a setting needs a new OUT
SETTINGS="MODEL RANKER PROMPTS N_PROMPTS K TEMPERATURE TOP_P MAX_TOKENS SEED SEED_MODE PROB_MODE ETA LR EPOCHS
          BATCH MICRO_BATCH OPTIMIZER WARMUP MAX_LENGTH MAX_PROMPT_LENGTH SELECT TRAIN_SEED GEN_ARGS RANK_ARGS TRAIN_ARGS"
LOSS=${LOSS:-sppo}
[ "$LOSS" = sppo ] || SETTINGS="$SETTINGS LOSS"   # runs made before --loss existed were all sppo
LORA_R=${LORA_R:-0} LORA_ALPHA=${LORA_ALPHA:-16} LORA_DROPOUT=${LORA_DROPOUT:-0} LORA_TARGETS=${LORA_TARGETS:-all-linear}
[ "$LORA_R" = 0 ] || SETTINGS="$SETTINGS LORA_R LORA_ALPHA LORA_DROPOUT LORA_TARGETS"   # and before LoRA, none had it
SPLIT_PROMPTS=${SPLIT_PROMPTS:-0}
[ "$SPLIT_PROMPTS" = 0 ] || SETTINGS="$SETTINGS SPLIT_PROMPTS"   # (the same: earlier runs did not split)
case "$SPLIT_PROMPTS" in
    0) ;;
    1) [[ ${N_PROMPTS-} =~ ^[1-9][0-9]*$ ]] || {
        echo "run_loop: SPLIT_PROMPTS=1 needs N_PROMPTS, the prompts of each iteration; got '${N_PROMPTS-}'" >&2; exit 2; } ;;
    *) echo "run_loop: SPLIT_PROMPTS is 0 or 1; got '$SPLIT_PROMPTS'" >&2; exit 2 ;;
esac
[ "$BATCH_INVARIANT" = 0 ] || SETTINGS="$SETTINGS BATCH_INVARIANT"   # (likewise: runs made before it had it off)
mkdir -p "$OUT"
# One loop per OUT: the lock is held by this shell and inherited by its stages, so a second loop started
# while this one (or a stage orphaned by killing this shell alone) still runs is refused.
exec 9>> "$OUT/.lock"
lock_rc=0; lock_error=$(flock -n -E 75 9 2>&1) || lock_rc=$?  # (the lock belongs to fd 9's open file: it outlives $(...))
if (( lock_rc )); then
    case $lock_rc in
        75) echo "run_loop: another run is using $OUT (a loop or one of its stages); stop it first" >&2 ;;
        *) echo "run_loop: cannot lock $OUT/.lock ($lock_error): its filesystem may not support locks (Lustre" \
                "mounted without -o flock, some NFS setups); put OUT on one that does" >&2 ;;
    esac
    exit 2
fi
pairs=(); for v in $SETTINGS; do pairs+=("$v=${!v-}"); done
"$PYTHON" common.py check-run-settings "$OUT/settings.txt" "${pairs[@]}" || exit 2   # common.check_settings

STAGES_RUN=0
# --- progress: a line when a stage starts, and $OUT/status.json (written whole, then renamed) when a stage starts
# and ends, for a user or a dashboard: {"iteration", "iterations", "stage", "state": running | done, "started" (this
# stage, UTC), "done" (this iteration's finished stages, those done earlier included), "eta_seconds"}. The ETA is
# the time the stages still to finish took in the previous iteration (null in the first, or when one of them was
# done earlier). A stage done earlier changes nothing on disk: a rerun of a finished loop writes no file.
declare -A TOOK=()  # [iteration:stage] seconds, of the stages this loop ran
status() {  # status STAGE running|done|"done earlier" [SECONDS]
    local stage=$1 state=$2 s left=0 done_json=""
    if [ "${STATUS_ITER-}" != "$t" ]; then DONE=(); STATUS_ITER=$t; fi
    if [ "$state" != running ]; then DONE+=("$stage"); fi
    if [ "$state" = "done earlier" ]; then return 0; fi
    if [ "$state" = running ]; then STARTED=$(date -u +%FT%TZ); else TOOK[$t:$stage]=$3; fi
    for s in generate rank train; do
        [[ " ${DONE[*]-} " == *" $s "* ]] && continue
        if [ -n "$left" ] && [ -n "${TOOK[$((t - 1)):$s]+set}" ]; then left=$(( left + TOOK[$((t - 1)):$s] )); else left=; fi
    done
    for s in "${DONE[@]-}"; do [ -n "$s" ] && done_json+="${done_json:+, }\"$s\""; done
    printf '{"iteration": %d, "iterations": %d, "stage": "%s", "state": "%s", "started": "%s", "done": [%s], "eta_seconds": %s}\n' \
        "$t" "$ITERS" "$stage" "$state" "$STARTED" "$done_json" "${left:-null}" > "$OUT/status.json.tmp"
    mv "$OUT/status.json.tmp" "$OUT/status.json"
    if [ "$state" = running ]; then
        echo "[iter $t] $stage: started${left:+, ~$(( (left + 59) / 60 )) min left in the iteration (as iteration $(( t - 1 )))}"
    fi
}
# die STAGE LOG: stop the loop, naming the stage and where to look.
die() { echo "run_loop: stage '$1' failed (iteration $t); see $2" >&2; tail -n 3 "$2" | sed 's/^/    /' >&2; exit 1; }

# shard_launcher S W: the command prefix (in LAUNCH) that starts shard S of a stage giving each shard W GPUs.
# With GPUs it sees only its W devices (the S-th W of DEVICES on its node) and has its own vLLM cache directory
# unless the user set VLLM_CACHE_ROOT: every vLLM process calls itself rank 0, and eight of them compiling into
# one torch.compile cache collide (under SLURM the directory names the node too: home directories are shared).
# Under SLURM it runs as a one-task job step on node S / (shards per node).
shard_launcher() {
    local s=$1 w=$2 per_node=$(( NPROC / $2 )) devices node=
    LAUNCH=()
    if (( ${#NODES[@]} )); then
        node=${NODES[s / per_node]}
        LAUNCH=(srun --nodes=1 --ntasks=1 --nodelist="$node" $(step_resources "$w" "$per_node") --input=none --quiet)
    fi
    if (( SLURM_GPUS )); then  # SLURM sets the step's CUDA_VISIBLE_DEVICES; the cache is the node's s-th slot's
        LAUNCH+=(env VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm/$node-slot-$(( s % per_node ))}")
    elif (( GPUS > 0 )); then
        devices=$(IFS=,; echo "${DEVICES[*]:(s % per_node) * w:w}")
        LAUNCH+=(env CUDA_VISIBLE_DEVICES="$devices"
                 VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm/${node:+$node-}device-$devices}")
    fi
}

# sharded STAGE OUT W ORDER CMD...: run `CMD --shard s/n --out OUT.s` for n shards of W GPUs each (one per GPU of
# every node when W is 1) side by side, then merge the shard outputs into OUT in the order of the records in ORDER
# (the stage's input), so OUT, and the batches training draws from it, do not depend on n. Each shard resumes by
# itself after a crash. The first shard to fail stops the stage at once: its siblings are stopped, and the loop
# exits naming its log.
sharded() {
    local stage=$1 out=$2 w=$3 order=$4 s; shift 4
    if [ -f "$out" ]; then  # (a kill between the rename and the clean-up below leaves shard files: gone now)
        rm -f "$out".[0-9]*
        echo "[iter $t] $stage: done earlier ($out)"; status "$stage" "done earlier"; return
    fi
    local start=$SECONDS n=$(( ${#NODES[@]} > 0 ? ${#NODES[@]} * NPROC / w : NPROC / w )) shards=()
    SHARD_PIDS=()
    status "$stage" running
    for ((s = 0; s < n; s++)); do
        shard_launcher "$s" "$w"
        "${LAUNCH[@]}" "$@" --shard "$s/$n" --out "$out.$s" > "$LOGS/$stage.$s.log" 2>&1 &
        SHARD_PIDS+=($!)
        shards+=("$out.$s")
    done
    wait_shards "$stage"
    "$PYTHON" common.py merge-shards "$out" "$order" "${shards[@]}" || die "$stage (merging its shards)" /dev/null
    rm -f "${shards[@]}"
    echo "[iter $t] $stage: $(( SECONDS - start ))s  $(tail -n 1 "$LOGS/$stage.0.log")"
    status "$stage" done $(( SECONDS - start ))
    STAGES_RUN=$(( STAGES_RUN + 1 ))
}

# wait_shards STAGE: wait for SHARD_PIDS (checked every second, in any order); when one fails, stop the others and die.
wait_shards() {
    local s rc left=${#SHARD_PIDS[@]}
    while (( left )); do
        for s in "${!SHARD_PIDS[@]}"; do
            [ -n "${SHARD_PIDS[s]}" ] && ! kill -0 "${SHARD_PIDS[s]}" 2>/dev/null || continue
            rc=0; wait "${SHARD_PIDS[s]}" || rc=$?
            SHARD_PIDS[s]=; left=$(( left - 1 ))
            if (( rc )); then
                echo "run_loop: shard $s/${#SHARD_PIDS[@]} of '$1' exited with $rc; stopping the other shards" >&2
                stop_shards
                die "$1" "$LOGS/$1.$s.log"
            fi
        done
        if (( left )); then sleep 1; fi
    done
}

# stop_shards: SIGTERM every running shard and what it started (vLLM's engine processes, which hold the GPU and the
# lock on OUT too), SIGKILL what is left after 10 s, and wait, so that a rerun can start at once.
stop_shards() {
    local pid tree=() i
    for pid in "${SHARD_PIDS[@]-}"; do [ -n "$pid" ] && tree+=($(descendants "$pid") "$pid"); done
    (( ${#tree[@]} )) || return 0
    kill -TERM "${tree[@]}" 2>/dev/null || true
    for ((i = 0; i < 10; i++)); do kill -0 "${tree[@]}" 2>/dev/null || break; sleep 1; done
    kill -KILL "${tree[@]}" 2>/dev/null || true
    for pid in "${SHARD_PIDS[@]-}"; do [ -n "$pid" ] && { wait "$pid" 2>/dev/null || true; }; done
    SHARD_PIDS=()
}
descendants() { local c; for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done; }
SHARD_PIDS=()
trap 'stop_shards; exit 143' TERM
trap 'stop_shards; exit 130' INT

# step_resources W K: srun's options for one of K steps side by side on a node, W GPUs each: with SLURM_GPUS its
# own W GPUs and 1/K of the node's CPUs (--exact: only those); otherwise the steps share the node (--overlap).
step_resources() {
    if (( SLURM_GPUS )); then echo "--exact --gres=gpu:$1 --cpus-per-task=$(( ${SLURM_CPUS_ON_NODE:-$2} / $2 ))"
    else echo --overlap; fi
}

# train_launcher: how training starts (in LAUNCH): one process on the CPU or one GPU; torchrun's GPUS processes
# on one machine; under SLURM one torchrun per node (srun), GPUS processes each, meeting at the first node (c10d).
# Every process takes its share of one global batch, so the losses do not depend on how many there are.
train_launcher() {
    LAUNCH=()
    if (( GPUS > 0 && ! SLURM_GPUS )); then LAUNCH=(env CUDA_VISIBLE_DEVICES="$TRAIN_DEVICES"); fi
    if (( ${#NODES[@]} )); then
        local addr port=${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
        addr=$(node_addr "${NODES[0]}")
        # --kill-on-bad-exit: a node whose torchrun fails ends the step at once, rather than the others waiting out
        # the process group's timeout (60 minutes; 180 for the 70B config). Each torchrun advertises its node's
        # address (PET_LOCAL_ADDR is its --local-addr): its host name may resolve to 127.0.1.1 on its own node.
        LAUNCH=(srun --nodes="${#NODES[@]}" --ntasks="${#NODES[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1
                $(step_resources "$GPUS" 1) --input=none --quiet
                bash -c "$(declare -f node_addr); "'export PET_LOCAL_ADDR=$(node_addr "$SLURMD_NODENAME"); exec "$@"' local-addr
                "${LAUNCH[@]}" "$PYTHON" -m torch.distributed.run --nnodes "${#NODES[@]}" --nproc_per_node "$NPROC"
                --rdzv-backend c10d --rdzv-endpoint "${addr:-${NODES[0]}}:$port" --rdzv-id "sppo-$SLURM_JOB_ID-$t")
    elif (( GPUS > 1 )); then LAUNCH+=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
    else LAUNCH+=("$PYTHON"); fi
}

# node_addr NODE: the address SLURM reaches NODE at (its NodeAddr), else its name.
node_addr() { local a; a=$(scontrol show node "$1" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2); echo "${a:-$1}"; }

model=$MODEL
for ((t = 1; t <= ITERS; t++)); do
    dir=$OUT/iter$t
    LOGS=$dir/logs
    mkdir -p "$LOGS"
    prompts=${PROMPTS//\{iter\}/$t}   # e.g. UCLA-AGI/data-mistral-7b-instruct-sppo-iter{iter}
    SKIP=(); [ "$SPLIT_PROMPTS" = 0 ] || SKIP=(--skip $(( (t - 1) * N_PROMPTS )))   # disjoint parts of one file

    # 1. y_1..y_K ~ pi_t(.|x) for every prompt x
    sharded generate "$dir/generated.jsonl" "$TP" "$prompts" \
        "${GEN_ENV[@]}" "$PYTHON" generate.py --model "$model" --prompts "$prompts" "${SKIP[@]}" ${N_PROMPTS:+--limit "$N_PROMPTS"} \
        --k "$K" --temperature "$TEMPERATURE" --top-p "$TOP_P" --max-tokens "$MAX_TOKENS" \
        --seed "$SEED" --seed-mode "$SEED_MODE" "${TP_ARGS[@]}" ${GEN_ARGS-}

    # 2. P(y_i beats y_j | x) for every ordered pair, and each response's win rate W_i = mean_j P_ij
    sharded rank "$dir/ranked.jsonl" 1 "$dir/generated.jsonl" \
        "$PYTHON" rank.py --in "$dir/generated.jsonl" --ranker "$RANKER" --prob-mode "$PROB_MODE" ${RANK_ARGS-}

    # 3. pi_{t+1} = argmin E (log pi(y|x) - log pi_t(y|x) - eta (W(y) - 1/2))^2, with pi_t as reference
    #    (LOSS=dpo or ipo: the paper's iterative DPO / IPO baselines on the same best/worst pairs)
    ckpt=$dir/checkpoint
    if [ -d "$ckpt" ]; then
        echo "[iter $t] train: done earlier ($ckpt)"
        status train "done earlier"
    else
        start=$SECONDS
        status train running
        train_launcher
        "${LAUNCH[@]}" train_sppo.py --model "$model" --data "$dir/ranked.jsonl" --out "$ckpt" \
            --eta "$ETA" --lr "$LR" --epochs "$EPOCHS" --batch-size "$BATCH" --micro-batch-size "$MICRO_BATCH" \
            --optimizer "$OPTIMIZER" --warmup-ratio "$WARMUP" --max-length "$MAX_LENGTH" \
            --max-prompt-length "$MAX_PROMPT_LENGTH" --select "$SELECT" --seed "$TRAIN_SEED" --loss "$LOSS" \
            --lora-r "$LORA_R" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" --lora-targets "$LORA_TARGETS" \
            --save-every "$SAVE_EVERY" --report-to "$REPORT_TO" ${TRAIN_ARGS-} \
            > "$LOGS/train.log" 2>&1 || die train "$LOGS/train.log"
        echo "[iter $t] train: $(( SECONDS - start ))s  $(tail -n 1 "$LOGS/train.log")"
        status train done $(( SECONDS - start ))
        STAGES_RUN=$(( STAGES_RUN + 1 ))
    fi
    model=$ckpt   # pi_{t+1}: the next iteration's generator and reference
done

if (( STAGES_RUN == 0 )); then
    echo "run_loop: all $(( 3 * ITERS )) stages were already complete in $OUT; nothing to do"
else
    echo "run_loop: $STAGES_RUN stages run; final model $model"
fi
