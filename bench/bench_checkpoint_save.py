"""Rank 0's host memory while train_sppo.save_checkpoint writes a sharded run's checkpoint, against the size of
the weights in fp32: what bounds the first node's memory at a 70B save (282 GB of fp32 weights).

    python bench/bench_checkpoint_save.py --out bench/results/checkpoint_save_cpu.json

One CPU process plays rank 0: its fp32 model (on a GPU box the model is sharded on the GPUs, so only the gathered
copy is on the host) and the gather, which returns fresh fp32 host tensors as get_model_state_dict(full_state_dict,
cpu_offload) does. The checkpoint is saved in bf16, as the recipes' models are. 2-core Intel Xeon, 2026-12-06, a
100M-parameter model (0.414 GB in fp32): the save adds 1.01x the fp32 weights (the gathered copy; each tensor is
cast and let go in turn), where casting the whole state while it was alive added 1.51x. The peak is the process's resident
high-water mark (VmHWM, reset just before the gather) minus its resident memory then: the host bytes the save adds.
"""
import argparse
import os
import tempfile

from benchutil import machine, table, write_json


def measure(size, vocab, d):
    import torch
    import torch.distributed.checkpoint.state_dict as sd
    from bench_train import random_policy
    from transformers import AutoModelForCausalLM
    import json
    import train_sppo
    from common import load_tokenizer
    policy = os.path.join(d, "policy")
    n = random_policy(policy, size, vocab_size=vocab)
    config = json.load(open(os.path.join(policy, "config.json")))
    json.dump(config | {"dtype": "bfloat16"}, open(os.path.join(policy, "config.json"), "w"))
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    with torch.no_grad():  # the weights in memory of their own, not pages of the mapped file that the gather reads in
        for p in model.parameters():
            p.data = p.data.clone()
    sd.get_model_state_dict = lambda m, options: {k: v.detach().clone() for k, v in m.state_dict().items()}
    # (a tied weight comes under both its names, as its two copies: what the fixed gather gives the save)
    run = type("Run", (), {"sharded": True, "master": True})()
    args = train_sppo.parser().parse_args(["--model", policy, "--data", "-", "--out", os.path.join(d, "ckpt")])
    tok = load_tokenizer(policy)
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := the current resident size (Linux)
        f.write("5")
    before = rss()
    train_sppo.save_checkpoint(model, tok, args, run, os.path.join(d, "ckpt.tmp"), {})
    added = train_sppo.peak_rss() - before
    fp32 = 4 * n
    return {"parameters": n, "fp32_weights_gb": fp32 / 1e9, "save_added_gb": added / 1e9, "ratio": added / fp32}


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100m", help="bench_train's model size")
    ap.add_argument("--vocab", type=int, default=600, help="vocabulary (the default, the tiny world's, keeps the "
                    "tied embedding, which the simulated gather copies twice, to 0.6%% of the weights)")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = measure(args.size, args.vocab, d)
    table([r], [("parameters", "parameters", "{:,}"), ("fp32_weights_gb", "fp32 weights (GB)", "{:.3f}"),
                ("save_added_gb", "host bytes the save adds (GB)", "{:.3f}"), ("ratio", "x fp32 weights", "{:.2f}")])
    if args.out:
        write_json(args.out, {"machine": machine(), **vars(args), "result": r})


if __name__ == "__main__":
    main()
