"""Host memory of train_sppo.py under torchrun: the summed peak RSS of its processes while they load and
shard the model (--phase load: what a GPU run's host memory sees, since after sharding the weights live on
the GPUs) or over a whole one-step CPU run (--phase run), for this checkout and for others given with --code
(an older commit, to compare before and after a change):

    git archive 541c378 | tar -x -C /tmp/before      # the code before rank-0-only loading
    python bench/bench_fsdp_load.py --code /tmp/before,. --out bench/results/fsdp_load_cpu.json

A random Llama whose weights dominate (--size 100m, vocabulary 32,000: 135M parameters, 517 MB in fp32), saved
as fp32 and as bf16 (as Mistral-7B-Instruct-v0.2 is published; train_sppo.py loads it into fp32 master
weights), --nproc processes on the CPU (gloo, FSDP2), 1 thread each; the run phase trains one AdamW step on 8
short pairs. A process's peak RSS is its VmHWM, written by a wrapper around
train_sppo.py right after load_model (load) or at exit (run). Every (checkpoint, code) pair runs --repeats
times, round-robin, and the median is reported.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchutil import machine, median, table, write_json

# Runs SCRIPT as __main__ in each torchrun process and appends {"rank", "peak_rss_mb", "rss_mb"} to $RSS_LOG,
# with PHASE=load right after load_model returns (then the process group is closed and the run stops).
# (VmHWM, not ru_maxrss: Linux starts a child's ru_maxrss at its parent's RSS.)
WRAPPER = '''import json, os, sys
def report():
    mb = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
    with open(os.environ["RSS_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ["RANK"]), "rss_mb": mb["VmRSS"], "peak_rss_mb": mb["VmHWM"]}) + "\\n")
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
import train_sppo
if os.environ["PHASE"] == "load":
    load = train_sppo.load_model
    def load_and_stop(args, run):
        load(args, run)
        report()
        run.finish()
        raise SystemExit(0)
    train_sppo.load_model = load_and_stop
else:
    import atexit
    atexit.register(report)
train_sppo.main()
'''


def run_once(code, d, ckpt, nproc, phase):
    """One torchrun of code/train_sppo.py: [(peak RSS MB, RSS MB at the end)] of each process, by rank."""
    log, out = os.path.join(d, "rss.jsonl"), os.path.join(d, "ckpt_out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(d, "wrapper.py"), os.path.join(os.path.abspath(code), "train_sppo.py"),
           "--model", os.path.join(d, ckpt), "--data", os.path.join(d, "ranked.jsonl"), "--out", out,
           "--eta", "1000", "--lr", "1e-6", "--optimizer", "adamw", "--batch-size", "8", "--micro-batch-size", "2",
           "--max-length", "256", "--max-prompt-length", "128"]
    env = dict(os.environ, RSS_LOG=log, PHASE=phase, OMP_NUM_THREADS="1", SPPO_PROGRESS="0", TQDM_DISABLE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{code}: torchrun failed:\n{p.stderr[-3000:]}")
    with open(log) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: r["rank"])
    os.remove(log)
    subprocess.run(["rm", "-rf", out])
    return [(r["peak_rss_mb"], r["rss_mb"]) for r in rows]


def make_checkpoints(d, size, vocab_size):
    """d/fp32 and d/bf16: the same random policy saved in both dtypes; returns its parameter count."""
    import bench_train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    n_params = bench_train.random_policy(os.path.join(d, "fp32"), size, vocab_size)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(d, "fp32"), dtype=torch.bfloat16)
    model.save_pretrained(os.path.join(d, "bf16"))
    tok = AutoTokenizer.from_pretrained(os.path.join(d, "fp32"))
    tok.save_pretrained(os.path.join(d, "bf16"))
    bench_train.write_data(d, bench_train.make_pairs(tok, 8, 20, 60))
    return n_params


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=".", help="comma-separated checkouts whose train_sppo.py to run")
    ap.add_argument("--size", default="100m", help="a random model size of bench_train.py")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--checkpoints", default="bf16,fp32", help="the saved checkpoint's dtypes to load")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--phase", choices=["load", "run"], default="load")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="bench/results/fsdp_load_cpu.json")
    args = ap.parse_args()
    codes, ckpts = args.code.split(","), args.checkpoints.split(",")
    runs = {(k, c): [] for k in ckpts for c in codes}
    with tempfile.TemporaryDirectory() as d:
        n_params = make_checkpoints(d, args.size, args.vocab_size)
        with open(os.path.join(d, "wrapper.py"), "w") as f:
            f.write(WRAPPER)
        for _ in range(args.repeats):
            for k, c in runs:
                runs[k, c].append(run_once(c, d, k, args.nproc, args.phase))
    weights_mb = n_params * 4 / 2**20
    rows = []
    for (k, c), xs in runs.items():
        peaks = [median([x[r][0] for x in xs]) for r in range(args.nproc)]
        ends = [median([x[r][1] for x in xs]) for r in range(args.nproc)]
        rows.append({"checkpoint": k, "code": c, "peak_by_rank": " / ".join(f"{x:.0f}" for x in peaks),
                     "peak_sum_mb": sum(peaks), "end_sum_mb": sum(ends), "peak_over_weights": sum(peaks) / weights_mb,
                     "peaks_mb": peaks, "end_mb": ends, "all": xs})
    print(f"model {args.size}, vocabulary {args.vocab_size}: {n_params / 1e6:.1f}M parameters, {weights_mb:.0f} MB "
          f"in fp32; {args.nproc} processes; phase {args.phase}")
    table(rows, [("checkpoint", "checkpoint", "{}"), ("code", "code", "{}"), ("peak_by_rank", "peak RSS MB by rank", "{}"),
                 ("peak_sum_mb", "summed peak MB", "{:.0f}"), ("peak_over_weights", "/ fp32 weights", "{:.2f}"),
                 ("end_sum_mb", "summed RSS at the end MB", "{:.0f}")])
    write_json(args.out, {"benchmark": "fsdp_load", "command": "python bench/bench_fsdp_load.py " + " ".join(sys.argv[1:]),
                          "machine": machine(), "size": args.size, "vocab_size": args.vocab_size, "parameters": n_params,
                          "weights_mb": weights_mb, "nproc": args.nproc, "phase": args.phase, "rows": rows})


if __name__ == "__main__":
    main()
