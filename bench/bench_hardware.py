"""What one iteration of each config needs and takes on H100s: arithmetic, not a measurement (docs/hardware.md).

    python bench/bench_hardware.py --out bench/results/hardware.json
    python bench/bench_hardware.py --mean-tokens 512 --decode-mfu 0.15      # other assumptions

Parameters and training memory come from bench_memory.py / bench_cluster_memory.py (the models' config.json).
Work per iteration, for P prompts, K answers of T new tokens each (T: --mean-tokens, default the recipe's cap,
2048, so the times are upper bounds) and N policy parameters (FLOPs = 2 x parameters x tokens for a forward):
  generation   2 N x P K T, decoding at --decode-mfu of the GPUs' bf16 peak (memory-bound, hence low);
  ranking      PairRM (0.435B) on K(K-1) ordered pairs per prompt of at most 2048 tokens each, at --mfu;
  training     (6 forward + backward, +2 the recomputation of gradient checkpointing, +2 the reference log-probs)
               x N x 2 P x L tokens (best and worst per prompt; L = prompt (at most MAX_PROMPT_LENGTH, 512) + answer,
               at most MAX_LENGTH, 1024), at --mfu.
Disk per iteration: the bf16 checkpoint (2 bytes a parameter), the training state while training (fp32 weights
and RMSprop, 8 bytes a parameter, two of them while a new one is written; removed at the end), and the two JSONL
files (about --bytes-per-token per sampled token each: its text and its id).
"""
import argparse
import json
import os

from bench_cluster_memory import MODELS, parameters
from bench_memory import GB, per_gpu

H100_BF16 = 989e12     # FLOP/s per H100 SXM, dense bf16 (NVIDIA's datasheet)
PAIRRM = 0.435e9       # PairRM's parameters (DeBERTa-v3-large backbone)
# config: (model, H100s it runs on: one box of 8, or 4 nodes of 8 for 70B)
CONFIGS = {"mistral7b": ("Mistral-7B-Instruct-v0.2", 8), "mistral7b-release": ("Mistral-7B-Instruct-v0.2", 8),
           "llama3-8b": ("Meta-Llama-3-8B-Instruct", 8), "gemma2-9b": ("gemma-2-9b-it", 8),
           "llama3-70b": ("Meta-Llama-3-70B-Instruct", 32)}


def iteration(model, gpus, prompts=20000, k=5, mean_tokens=2048, prompt_tokens=512, max_length=1024, pair_tokens=2048,
              mfu=0.4, decode_mfu=0.1, bytes_per_token=11):
    """One iteration's work (FLOPs), time (minutes) and disk (GB) for `model` (a MODELS entry) on `gpus` H100s."""
    n = parameters(model)
    peak = gpus * H100_BF16
    flops = {"generate": 2 * n * prompts * k * mean_tokens,
             "rank": 2 * PAIRRM * prompts * k * (k - 1) * pair_tokens,
             "train": 10 * n * 2 * prompts * min(max_length, prompt_tokens + mean_tokens)}
    minutes = {"generate": flops["generate"] / (decode_mfu * peak) / 60,
               "rank": flops["rank"] / (mfu * peak) / 60, "train": flops["train"] / (mfu * peak) / 60}
    jsonl = prompts * k * mean_tokens * bytes_per_token / GB
    return {"parameters_B": n / 1e9, "flops": flops, "minutes": minutes, "total_minutes": sum(minutes.values()),
            "gpu_gb_train": per_gpu(dict(model, micro=min(model["micro"], 64 // gpus)), gpus),
            "host_gb_rank0": 4 * n / GB, "checkpoint_gb": 2 * n / GB, "state_gb": 8 * n / GB,
            "state_gb_peak": 16 * n / GB, "jsonl_gb": 2 * jsonl}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20000, help="prompts per iteration (the recipe's ~20k)")
    ap.add_argument("--mean-tokens", type=int, default=2048, help="mean new tokens per answer (2048: the cap)")
    ap.add_argument("--mfu", type=float, default=0.4, help="share of the bf16 peak for ranking and training")
    ap.add_argument("--decode-mfu", type=float, default=0.1, help="share of the bf16 peak while decoding")
    ap.add_argument("--bytes-per-token", type=float, default=11, help="JSONL bytes per sampled token")
    ap.add_argument("--out", default="bench/results/hardware.json")
    args = ap.parse_args()
    rows = {name: {"model": model, "gpus": gpus,
                   **iteration(MODELS[model], gpus, args.prompts, mean_tokens=args.mean_tokens, mfu=args.mfu,
                               decode_mfu=args.decode_mfu, bytes_per_token=args.bytes_per_token)}
            for name, (model, gpus) in CONFIGS.items()}
    print(f"{'config':18} {'GPUs':>4} {'GB/GPU':>6} {'host GB':>7} {'ckpt GB':>7} {'state GB':>8} {'JSONL GB':>8} "
          f"{'gen min':>7} {'rank min':>8} {'train min':>9} {'total min':>9}")
    for name, r in rows.items():
        m = r["minutes"]
        print(f"{name:18} {r['gpus']:4d} {r['gpu_gb_train']:6.0f} {r['host_gb_rank0']:7.0f} {r['checkpoint_gb']:7.1f} "
              f"{r['state_gb']:8.0f} {r['jsonl_gb']:8.1f} {m['generate']:7.0f} {m['rank']:8.0f} {m['train']:9.0f} "
              f"{r['total_minutes']:9.0f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "hardware", "assumptions": vars(args), "h100_bf16_flops": H100_BF16,
                   "command": "python bench/bench_hardware.py", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
