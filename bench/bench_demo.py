"""End to end: `make demo` (build the tiny world, three SPPO iterations, evaluate), wall time split by stage.

    python bench/bench_demo.py --out bench/results/demo.json [--dir /tmp/demo_bench]

Runs `make demo TINY=DIR` from an empty DIR (default: a temporary directory, so runs/ is left alone), stamps
every output line with the time since the start, and reads the stages from what the steps print: the world
build's "written ... in Ns", run_loop.sh's "[iter t] STAGE: Ns" lines, and the evaluation as what follows
the loop's last line.
"""
import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

from benchutil import ROOT, machine, table, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="run directory (emptied first; default: a temporary one)")
    ap.add_argument("--out", default="bench/results/demo.json")
    ap.add_argument("--make", default="make")
    args = ap.parse_args()
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    d = os.path.abspath(args.dir or tmp.name)
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    p = subprocess.Popen([args.make, "-C", ROOT, "demo", f"TINY={d}"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, SPPO_PROGRESS="0"))
    lines = []
    for line in p.stdout:
        lines.append((time.time() - t0, line.rstrip()))
        print(f"[{lines[-1][0]:7.1f}s] {line.rstrip()}", flush=True)
    total = time.time() - t0
    if p.wait() != 0:
        raise SystemExit(f"make demo failed (exit {p.returncode})")

    stages = []
    for t, line in lines:
        m = re.search(r"tiny world written to .* in ([\d.]+)s", line)
        if m:
            stages.append({"stage": "build world", "seconds": float(m.group(1))})
        m = re.match(r"\[iter (\d+)\] (\w+): (\d+)s", line)
        if m:
            stages.append({"stage": f"iter {m.group(1)} {m.group(2)}", "seconds": float(m.group(3))})
    loop_end = max((t for t, line in lines if line.startswith("run_loop:")), default=None)
    if loop_end is not None:
        stages.append({"stage": "evaluate", "seconds": round(total - loop_end, 1)})
    for kind in ("generate", "rank", "train"):
        stages.append({"stage": f"all {kind}", "seconds": sum(s["seconds"] for s in stages if s["stage"].endswith(" " + kind))})
    stages.append({"stage": "make demo (wall)", "seconds": round(total, 1)})
    for s in stages:
        s["share"] = s["seconds"] / total
    table(stages, [("stage", "stage", "{}"), ("seconds", "seconds", "{:.1f}"), ("share", "share", "{:.0%}")])
    write_json(args.out, {"benchmark": "demo", "command": "python bench/bench_demo.py", "machine": machine(),
                          "stages": stages, "total_seconds": total})


if __name__ == "__main__":
    main()
