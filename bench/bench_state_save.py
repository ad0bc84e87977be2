"""What one training-state save of train_sppo.py costs (--save-every): seconds and bytes of save_state, and of
load_state reading it back, for the tiny policy and for a narrow model at a recipe's real vocabulary.

    python bench/bench_state_save.py --out bench/results/state_save_cpu.json

One process (the 8-GPU recipe writes the same bytes from 8 processes at once, each its own shards). Each model
is a random Llama (bench_train.random_policy) trained one RMSprop step (the recipe's optimizer), so the
optimizer state is there, with reference log-probs for the recipe's 20,000 prompts x 2 responses. Saves run
--repeats times (each replaces the previous, as in a run); the median is reported.
"""
import argparse
import os
import shutil
import tempfile
import time

from benchutil import machine, median, table, write_json

MODELS = {"tiny policy (vocab 600)": ("tiny", None), "narrow, vocab 128,256": ("narrow", 128256)}


def measure(size, vocab, repeats, d):
    import torch
    from bench_train import random_policy
    import train_sppo
    policy = os.path.join(d, "policy")
    n_params = random_policy(policy, size, vocab_size=vocab)
    args = train_sppo.parser().parse_args(["--model", policy, "--data", "-", "--out", os.path.join(d, "ckpt"),
                                           "--report-to", "none"])
    run = train_sppo.Run(0, 1, torch.device("cpu"), "fp32")
    model = train_sppo.load_model(args, run)
    params, opt, sched = train_sppo.make_optimizer(model, args, 312)
    x = torch.randint(0, model.config.vocab_size, (2, 64))
    model(input_ids=x, labels=x).loss.backward()
    train_sppo.optimizer_step(params, opt, sched, 1.0)
    ref = torch.zeros(20000, 2, dtype=torch.float64)
    saves, loads = [], []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        train_sppo.save_state(args.out, step, model, opt, sched, ref, [], 0.0, {}, run)
        saves.append(time.perf_counter() - t0)
        path = os.path.join(args.out + ".state", f"step-{step}")
        t0 = time.perf_counter()
        train_sppo.load_state(path, model, opt, sched, tuple(ref.shape), run)
        loads.append(time.perf_counter() - t0)
    size_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"parameters": n_params, "bytes": size_bytes, "bytes_per_parameter": size_bytes / n_params,
            "save_seconds": saves, "load_seconds": loads, "save_s": median(saves), "load_s": median(loads),
            "save_mb_per_s": size_bytes / median(saves) / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rows = {}
    for name, (size, vocab) in MODELS.items():
        d = tempfile.mkdtemp(prefix="state-save-")
        try:
            rows[name] = measure(size, vocab, args.repeats, d)
        finally:
            shutil.rmtree(d)
        r = rows[name]
        print(f"{name}: {r['parameters'] / 1e6:.2f}M parameters, {r['bytes'] / 1e6:.1f} MB per save "
              f"({r['bytes_per_parameter']:.2f} B/parameter), save {r['save_s']:.2f}s, load {r['load_s']:.2f}s",
              flush=True)
    table([{"model": name, **r} for name, r in rows.items()],
          [("model", "model", "{}"), ("parameters", "parameters", "{:,}"), ("bytes", "bytes per save", "{:,}"),
           ("bytes_per_parameter", "bytes / parameter", "{:.2f}"), ("save_s", "save s", "{:.2f}"),
           ("save_mb_per_s", "save MB/s", "{:.0f}"), ("load_s", "load s", "{:.2f}")])
    write_json(args.out, {"machine": machine(), "repeats": args.repeats, "results": rows})


if __name__ == "__main__":
    main()
