"""What stepping one tensor at a time costs under FSDP2: the host time of RMSprop's step over sharded parameters
(DTensors), foreach (torch's default on a GPU) against one tensor at a time (train_sppo.make_optimizer), in 2
processes (gloo) on a CPU.

    python bench/bench_optimizer_step.py --out bench/results/optimizer_step_cpu.json

Each model has a recipe's count of parameter tensors (decoder layers x 9: q, k, v, o, gate, up, down and two
norms; plus embeddings, lm_head and the final norm), each a tiny 64 x 16, so the arithmetic is negligible and
what is left is what a step costs per tensor on the host: Python, DTensor's dispatch, the kernel launches. On a
GPU the memory traffic of the step is the same on both paths (the same element-wise passes); one tensor at a time
adds this dispatch, part of which overlaps the GPU's work.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from benchutil import machine, median, write_json

LAYERS = {"Mistral-7B (32 layers)": 32, "Llama-3-70B (80 layers)": 80}


def worker(layers, repeats):
    """In each torchrun process: the step's median seconds, foreach and one tensor at a time (rank 0 prints)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    torch.manual_seed(0)

    class Tensors(torch.nn.Module):  # fully_shard wants a module with a forward; the step never runs one
        def __init__(self, n, children=()):
            super().__init__()
            self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(64, 16)) for _ in range(n)])
            self.layers = torch.nn.ModuleList(children)

        def forward(self):
            raise NotImplementedError

    model = Tensors(3, [Tensors(9) for _ in range(layers)])
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    seconds = {True: [], False: []}
    for _ in range(2):  # alternated, so a busy spell hits both
        for foreach in (True, False):
            opt = torch.optim.RMSprop(model.parameters(), lr=1e-6, foreach=foreach)
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()  # the state made, DTensor's sharding rules cached
            for _ in range(repeats):
                t0 = time.perf_counter()
                opt.step()
                seconds[foreach].append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"tensors": sum(1 for _ in model.parameters()), "foreach_s": median(seconds[True]),
                          "one_at_a_time_s": median(seconds[False])}))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/results/optimizer_step_cpu.json")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # layers, under torchrun
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.repeats)
    rows = []
    for name, layers in LAYERS.items():
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            os.path.abspath(__file__), "--worker", str(layers), "--repeats", str(args.repeats)],
                           capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if p.returncode != 0:
            raise SystemExit(p.stderr[-2000:])
        r = {"model": name, **json.loads(p.stdout.strip().splitlines()[-1])}
        r["extra_ms_a_tensor"] = (r["one_at_a_time_s"] - r["foreach_s"]) / r["tensors"] * 1e3
        rows.append(r)
        print(f"{name:26} {r['tensors']:4d} tensors: foreach {r['foreach_s'] * 1e3:6.1f} ms, one at a time "
              f"{r['one_at_a_time_s'] * 1e3:6.1f} ms ({r['extra_ms_a_tensor']:.3f} ms a tensor more)")
    write_json(args.out, {"benchmark": "optimizer_step", "machine": machine(), "processes": 2, "rows": rows,
                          "command": "python bench/bench_optimizer_step.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
