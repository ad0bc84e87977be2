"""Training memory on one device: the arithmetic for the recipes' models, and its small-scale check on a CPU.

    python bench/bench_memory.py --out bench/results/memory_cpu.json

One process (GPUS=1) holds the whole model: fp32 master weights (4 bytes a parameter), their fp32 gradients (4) and
RMSprop's one state buffer, square_avg (4): 12 bytes a parameter. In bf16 (the recipes' --dtype bf16) the model is
under FSDP2 in one process as in N (a group of one), whose policy casts each group's weights to bf16 just before it
runs and frees them after: the bf16 root (embeddings and lm_head, gathered through the forward and backward) and two
decoder layers (the one running and the one prefetched). Activations, with gradient checkpointing (each decoder
layer recomputed in backward): each layer's fp32 input, rows x tokens x hidden x 4 bytes, plus one layer's
recomputed intermediates at a time (MLP: about 8 bf16 tensors of rows x tokens x MLP width).

The check: train_sppo.py (RMSprop, gradient checkpointing, two steps of two micro-batches) on random Llama models of the same width at two
depths, in fp32 and in bf16; the difference of their peak memories (VmHWM) divided by the difference of their
parameter counts is the bytes a parameter that training holds, which the arithmetic predicts (12 in both dtypes: the bf16 copies are a
fixed two layers), with the fixed costs (imports, tokenizer, embeddings, activations) cancelling out.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchutil import LiveResults, machine, table

import bench_train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
# The recipes' models (their config.json): vocabulary, hidden, layers, MLP width, attention width (heads x head
# dim), KV width, tied embeddings, norms per layer; micro-batch prompts (rows = 2 x prompts: best and worst).
RECIPES = {
    "Mistral-7B-Instruct-v0.2": dict(V=32000, H=4096, L=32, I=14336, A=4096, KV=1024, tied=False, norms=2, micro=8),
    "Meta-Llama-3-8B-Instruct": dict(V=128256, H=4096, L=32, I=14336, A=4096, KV=1024, tied=False, norms=2, micro=8),
    "gemma-2-9b-it": dict(V=256000, H=3584, L=42, I=14336, A=4096, KV=2048, tied=True, norms=4, micro=4),
}


def linear_params(m):
    """Parameters of one decoder layer's linear weights: q, k, v, o and the MLP's gate, up, down."""
    return m["H"] * (2 * m["A"] + 2 * m["KV"]) + 3 * m["H"] * m["I"]


def bf16_gathered(m):
    """Parameters FSDP2 holds in bf16 at once: the root (embeddings, lm_head) and two decoder layers."""
    layer = linear_params(m) + m["norms"] * m["H"]
    return m["V"] * m["H"] * (1 if m["tied"] else 2) + 2 * layer


def recipe_memory(m, tokens=1024):
    """GB of one training process holding the whole model (GPUS=1), bf16 (FSDP2, a group of one), gradient
    checkpointing, at the two peaks of a step: a micro-batch's forward/backward after the first (the earlier
    micro-batches' gradients, the optimizer state and the gathered bf16 groups all alive), and the optimizer step
    (train_sppo steps one tensor at a time, so its temporary is the largest tensor's; torch's default on a GPU,
    foreach, would make one the size of the whole optimizer state: 4 bytes a parameter more)."""
    linear = m["L"] * linear_params(m)
    embed = m["V"] * m["H"]
    params = linear + m["L"] * m["norms"] * m["H"] + m["H"] + embed * (1 if m["tied"] else 2)
    rows = 2 * m["micro"]
    state = {"weights fp32": 4 * params / GB, "gradients fp32": 4 * params / GB, "RMSprop state": 4 * params / GB}
    forward = {"bf16 root + two layers": 2 * bf16_gathered(m) / GB,
               "checkpointed layer inputs": m["L"] * rows * tokens * m["H"] * 4 / GB,
               "one layer recomputed": 8 * rows * tokens * m["I"] * 2 / GB,
               "lm_head bf16 + logit chunks": (2 * embed + 3 * 2**26) / GB}
    held = sum(state.values())
    return {"parameters (B)": params / 1e9, **state, **forward, "forward peak": held + sum(forward.values()),
            "step peak": held + 4 * embed / GB, "step peak, foreach": held + 4 * params / GB,
            "total": held + max(sum(forward.values()), 4 * embed / GB)}


def lora_params(m, r):
    """Parameters of a rank-r LoRA adapter on every attention and MLP projection (train_sppo --lora-targets
    all-linear): r (inputs + outputs) per projection."""
    per_layer = (m["H"] + m["A"]) * 2 + (m["H"] + m["KV"]) * 2 + 3 * (m["H"] + m["I"])
    return m["L"] * r * per_layer


def lora_memory(m, micro, r=16, tokens=1024):
    """GB of one LoRA training process (GPUS=1, bf16, gradient checkpointing, micro prompts a forward): the frozen
    model in bf16 as stored (2 bytes a parameter), the adapter's fp32 weights, gradients and RMSprop state (12 bytes
    an adapter parameter), and recipe_memory's activations at this micro-batch (the adapter's own, r wide, are
    negligible). No frozen weight has a gradient or optimizer state: that is the 12 bytes a parameter full
    training pays and LoRA does not."""
    full = recipe_memory({**m, "micro": micro}, tokens)
    params, adapter = full["parameters (B)"] * 1e9, lora_params(m, r)
    state = {"frozen weights bf16": 2 * params / GB, "adapter fp32 + gradients + RMSprop": 12 * adapter / GB}
    forward = {k: full[k] for k in ("bf16 root + two layers", "checkpointed layer inputs", "one layer recomputed",
                                    "lm_head bf16 + logit chunks")}
    return {"adapter (M)": adapter / 1e6, **state, **forward, "total": sum(state.values()) + sum(forward.values())}


def lora_micro_batch(m, card_gb, r=16, tokens=1024):
    """The largest micro-batch (prompts a forward, a power of two up to 8) whose LoRA run fits card_gb; 0: none."""
    fits = [micro for micro in (1, 2, 4, 8) if lora_memory(m, micro, r, tokens)["total"] <= card_gb]
    return max(fits, default=0)


def per_gpu(m, gpus, tokens=1024, foreach=False):
    """GB on each GPU, the higher of a step's two peaks: under FSDP2 each process holds 1/GPUS of the fp32 weights,
    gradients and RMSprop state, and as one process the gathered bf16 groups and the same activations in a
    micro-batch's forward; the optimizer step, which runs after those are freed, adds one temporary of its largest
    shard (train_sppo.py steps one tensor at a time: 1/GPUS of the embeddings), or with foreach (torch's default on
    a GPU) 1/GPUS of the whole state's. GPUS=1 is recipe_memory's total."""
    r = recipe_memory(m, tokens)
    acts = sum(r[k] for k in ("bf16 root + two layers", "checkpointed layer inputs", "one layer recomputed",
                              "lm_head bf16 + logit chunks"))
    params = r["parameters (B)"] * 1e9
    step = 4 * (params if foreach else m["V"] * m["H"]) / gpus / GB
    return 12 * params / gpus / GB + max(acts, step)


def measure(args, tmp, layers, dtype):
    """train_sppo.py's peak memory (GB, VmHWM) on a random model with this many layers (dtype lora-fp32: a LoRA run of
    rank --lora-r in fp32): two steps of two
    micro-batches, so that the second micro-batch's forward runs with every term of the arithmetic alive (the first
    micro-batch's gradients, the optimizer state of step 1, the gathered bf16 groups), as every step of the recipe does."""
    d = os.path.join(tmp, f"L{layers}")
    if not os.path.isdir(d):
        os.makedirs(d)
        bench_train.random_policy(os.path.join(d, "policy"), args.size, layers=layers)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.join(d, "policy"))
        bench_train.write_data(d, bench_train.make_pairs(tok, args.pairs, 16, 48))
    out = os.path.join(d, f"ckpt-{dtype}")
    lora = ["--lora-r", str(args.lora_r)] if dtype.startswith("lora-") else []
    cmd = [sys.executable, os.path.join(ROOT, "train_sppo.py"), "--model", os.path.join(d, "policy"), "--data",
           os.path.join(d, "ranked.jsonl"), "--out", out, "--batch-size", str(args.pairs), "--micro-batch-size",
           str(args.pairs // 2), "--epochs", "2", "--optimizer", "rmsprop", "--gradient-checkpointing", "--dtype",
           dtype.removeprefix("lora-"), "--eta", "5", "--report-to", "none", *lora]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", SPPO_PROGRESS="0"))
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    with open(os.path.join(out, "sppo_train.json")) as f:
        stats = json.load(f)["stats"]
    subprocess.run(["rm", "-rf", out])
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch
    with torch.device("meta"):
        n = sum(x.numel() for x in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(os.path.join(d, "policy"))).parameters())
    return stats["peak_memory_gb"] * 2**30 / GB, n


def predicted_bytes(args, dtype):
    """Bytes a parameter the arithmetic predicts for the slope between the two depths: 12 in full training; with LoRA
    (fp32, as the random model is stored) 4 for the frozen weights plus 12 for each adapter parameter the extra layers
    bring, per parameter they bring."""
    if not dtype.startswith("lora-"):
        return 12
    import bench_train as bt
    s = bt.SIZES[args.size]
    width = 64 * s["num_attention_heads"]  # random_policy's head_dim 64, as many KV heads as heads
    m = dict(H=s["hidden_size"], A=width, KV=width, I=s["intermediate_size"], L=1)
    per_layer = linear_params(m) + 2 * m["H"]
    return 4 + 12 * lora_params(m, args.lora_r) / per_layer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100m", help="bench_train's model width (100m: hidden 1024, MLP 2816)")
    ap.add_argument("--layers", default="2,10", help="the two depths")
    ap.add_argument("--pairs", type=int, default=8, help="pairs of one step (two micro-batches)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="train_sppo.py --dtype of each check (bf16 is slow on a "
                    "CPU); "
                    "lora-fp32: a LoRA run of rank --lora-r")
    ap.add_argument("--lora-r", type=int, default=16, help="the adapter's rank in the lora-fp32 check")
    ap.add_argument("--out", default="bench/results/memory_cpu.json")
    args = ap.parse_args()
    lo, hi = map(int, args.layers.split(","))
    recipes = {name: recipe_memory(m) for name, m in RECIPES.items()}
    table([{"model": n, **r} for n, r in recipes.items()],
          [("model", "one GPU, GB", "{}"), *((k, k, "{:.2f}") for k in next(iter(recipes.values())))])
    dtypes = args.dtypes.split(",")
    gpus = [1, 2, 4, 8]
    table([{"model": n, **{f"GPUS={g}": per_gpu(m, g) for g in gpus}} for n, m in RECIPES.items()],
          [("model", "GB per GPU", "{}"), *((f"GPUS={g}", f"GPUS={g}", "{:.1f}") for g in gpus)])
    lora = {n: {f"micro {b}": lora_memory(m, b)["total"] for b in (1, 2, 4, 8)} for n, m in RECIPES.items()}
    table([{"model": n, **r} for n, r in lora.items()],
          [("model", "LoRA r16, one GPU, GB", "{}"), *((k, k, "{:.1f}") for k in next(iter(lora.values())))])
    recipes = {n: {**r, **{f"per GPU, GPUS={g}": per_gpu(RECIPES[n], g) for g in gpus},
                   "LoRA r16, one GPU": {**lora_memory(RECIPES[n], 1), **lora[n]}} for n, r in recipes.items()}
    live = LiveResults(args.out, dtypes, benchmark="memory", machine=machine(), recipes=recipes,
                       command="python bench/bench_memory.py " + " ".join(sys.argv[1:]), checks=[])
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            (a, na), (b, nb) = measure(args, tmp, lo, dtype), measure(args, tmp, hi, dtype)
            predicted = predicted_bytes(args, dtype)
            live.data["checks"].append({"dtype": dtype, "layers": [lo, hi], "parameters": [na, nb], "peak_gb": [a, b],
                                        "bytes_per_parameter": (b - a) * GB / (nb - na), "predicted": predicted})
            live.point(dtype)
    table(live.data["checks"], [("dtype", "dtype", "{}"), ("bytes_per_parameter", "measured bytes/param", "{:.2f}"),
                                ("predicted", "predicted", "{:.2f}")])
    live.finish()


if __name__ == "__main__":
    main()
