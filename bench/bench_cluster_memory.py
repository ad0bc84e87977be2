"""Training memory per GPU past one box (issue 20): the arithmetic of bench_memory.py, with FSDP2's sharding over
1, 8 and 16 GPUs of 80 GB, for the recipes' models and Gemma-2-27B and Llama-3-70B. Arithmetic only: no GPU ran it.

    python bench/bench_cluster_memory.py --out bench/results/cluster_memory.json

One process (GPUS=1) holds everything: bench_memory.recipe_memory. Under torchrun over N processes (train_sppo.py:
fully_shard on every decoder layer, then the root; bf16 MixedPrecisionPolicy, fp32 gradient reduction):
  - sharded state: fp32 weights, gradients, RMSprop's square_avg: 12 bytes a parameter / N;
  - gathered for compute: two decoder layers' weights in bf16 (the one running and the one prefetched), one layer's
    unsharded fp32 gradients before their reduce-scatter, and the root (embeddings, lm_head) in bf16 with its fp32
    gradients at the end of backward (the root is not resharded after forward);
  - activations with gradient checkpointing at the micro-batch each process gets (global batch 64 / N at most):
    each layer's bf16 input, one layer's recomputed intermediates (about 8 bf16 tensors of rows x tokens x MLP
    width), the log-prob chunks (bench_memory's 3 x 2^26 bytes).
Rank 0 alone reads the checkpoint in fp32 (4 bytes a parameter of host memory).
"""
import argparse
import json
import os

from bench_memory import GB, RECIPES, linear_params, recipe_memory

MODELS = {**RECIPES,  # their config.json
          "gemma-2-27b-it": dict(V=256000, H=4608, L=46, I=36864, A=4096, KV=2048, tied=True, norms=4, micro=4),
          "Meta-Llama-3-70B-Instruct": dict(V=128256, H=8192, L=80, I=28672, A=8192, KV=1024, tied=False, norms=2,
                                            micro=1)}
GPU_GB, BATCH, TOKENS = 80, 64, 1024


def parameters(m):
    """(all parameters, one decoder layer's, the root's: embeddings, lm_head and final norm)."""
    layer = linear_params(m) + m["norms"] * m["H"]
    root = m["V"] * m["H"] * (1 if m["tied"] else 2) + m["H"]
    return m["L"] * layer + root, layer, root


def sharded_memory(m, n, tokens=TOKENS):
    """GB per GPU of one of n FSDP2 processes (n > 1), bf16 compute, gradient checkpointing."""
    total, layer, root = parameters(m)
    rows = 2 * min(m["micro"], BATCH // n)  # best and worst of each prompt
    parts = {"sharded weights+grads+RMSprop": 12 * total / n / GB,
             "gathered layers + layer grads": (2 * 2 * layer + 4 * layer) / GB,
             "root bf16 + its grads": (2 + 4) * root / GB,
             "checkpointed layer inputs": m["L"] * rows * tokens * m["H"] * 2 / GB,
             "one layer recomputed": 8 * rows * tokens * m["I"] * 2 / GB,
             "log-prob chunks": 3 * 2**26 / GB}
    parts["total"] = sum(parts.values())
    return parts


def rows():
    out = []
    for name, m in MODELS.items():
        total = parameters(m)[0]
        one = recipe_memory(m)["total"]
        row = {"model": name, "parameters_B": total / 1e9, "host_gb_rank0": 4 * total / GB,
               "gpu_gb": {"1": one, **{str(n): sharded_memory(m, n)["total"] for n in (8, 16)}},
               "micro_batch": {str(n): min(m["micro"], BATCH // n) for n in (1, 8, 16)},
               "generation_weights_gb_per_gpu": {f"TP={tp}": 2 * total / tp / GB for tp in (1, 2, 4)}}
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/cluster_memory.json")
    args = ap.parse_args()
    table = rows()
    print(f"{'model':28} {'params B':>8} {'rank0 host GB':>13} " + " ".join(f"{n + ' x 80 GB':>12}" for n in "1 8 16".split()))
    for r in table:
        cells = " ".join(f"{r['gpu_gb'][n]:9.1f} {'ok' if r['gpu_gb'][n] <= GPU_GB else 'no':>2}" for n in ("1", "8", "16"))
        print(f"{r['model']:28} {r['parameters_B']:8.2f} {r['host_gb_rank0']:13.0f} {cells}")
    print("\n" + "\n".join(f"{r['model']}: {json.dumps({k: round(v, 2) for k, v in sharded_memory(MODELS[r['model']], 16).items()})}"
                           for r in table[-1:]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "cluster_memory", "gpu_gb": GPU_GB, "global_batch": BATCH, "tokens": TOKENS,
                   "command": "python bench/bench_cluster_memory.py", "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
