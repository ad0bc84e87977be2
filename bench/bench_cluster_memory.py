"""Training memory per GPU past one box: bench_memory.py's arithmetic (recipe_memory for one process,
per_gpu under FSDP2) over 1, 8, 16 and 32 GPUs of 80 GB, for the recipes' models and Gemma-2-27B and Llama-3-70B,
at the micro-batch each process gets (the recipe's, at most the global 64 / processes). Arithmetic only: no GPU
ran it.

    python bench/bench_cluster_memory.py --out bench/results/cluster_memory.json

train_sppo.py's optimizer steps one tensor at a time, so the step's temporary is one shard's. Torch's default on a
GPU (foreach) would step all of a process's shards at once: a temporary of 4 bytes a parameter / GPUS, alive after
the activations are freed; the JSON also gives that temporary and the peak it would make (gpu_gb_foreach). Rank 0
alone reads the checkpoint in fp32 (4 bytes a parameter of host memory).
"""
import argparse
import json
import os

from bench_memory import GB, RECIPES, linear_params, per_gpu

MODELS = {**RECIPES,  # their config.json
          "gemma-2-27b-it": dict(V=256000, H=4608, L=46, I=36864, A=4096, KV=2048, tied=True, norms=4, micro=4),
          "Meta-Llama-3-70B-Instruct": dict(V=128256, H=8192, L=80, I=28672, A=8192, KV=1024, tied=False, norms=2,
                                            micro=1)}
GPU_GB, BATCH, GPUS = 80, 64, (1, 8, 16, 32)


def parameters(m):
    """All parameters: the decoder layers (linear weights and norms), embeddings and lm_head, the final norm."""
    return m["L"] * (linear_params(m) + m["norms"] * m["H"]) + m["V"] * m["H"] * (1 if m["tied"] else 2) + m["H"]


def rows():
    out = []
    for name, m in MODELS.items():
        total = parameters(m)
        micro = {n: min(m["micro"], BATCH // n) for n in GPUS}
        out.append({"model": name, "parameters_B": total / 1e9, "host_gb_rank0": 4 * total / GB,
                    "gpu_gb": {str(n): per_gpu(dict(m, micro=micro[n]), n) for n in GPUS},
                    "gpu_gb_foreach": {str(n): per_gpu(dict(m, micro=micro[n]), n, foreach=True) for n in GPUS},
                    "foreach_temporary_gb": {str(n): 4 * total / n / GB for n in GPUS if n > 1},
                    "micro_batch": {str(n): micro[n] for n in GPUS},
                    "generation_weights_gb_per_gpu": {f"TP={tp}": 2 * total / tp / GB for tp in (1, 2, 4)}})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/cluster_memory.json")
    args = ap.parse_args()
    table = rows()
    print(f"{'model':28} {'params B':>8} {'rank0 host GB':>13} " + " ".join(f"{f'{n} x 80 GB':>12}" for n in GPUS))
    for r in table:
        cells = " ".join(f"{r['gpu_gb'][str(n)]:9.1f} {'ok' if r['gpu_gb'][str(n)] <= GPU_GB else 'no':>2}" for n in GPUS)
        print(f"{r['model']:28} {r['parameters_B']:8.2f} {r['host_gb_rank0']:13.0f} {cells}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "cluster_memory", "gpu_gb": GPU_GB, "global_batch": BATCH,
                   "command": "python bench/bench_cluster_memory.py", "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
