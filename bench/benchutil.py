"""What the benchmarks share: the machine's description, interleaved repeated timing, a table, the JSON file."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))


def machine():
    """Where and when: CPU model and cores, GPU name, load average, library versions, date (UTC)."""
    import torch
    import transformers
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    return info


def interleaved(fns, repeats, sync=None):
    """Run every fn once per round, `repeats` rounds, round-robin (so a busy spell on a shared machine hits
    all of them alike). Returns {name: [seconds of each round]} and {name: the last return value}."""
    times, results = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            results[name] = fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times, results


def median(xs):
    return statistics.median(xs)


def table(rows, columns):
    """Print rows (dicts) as a fixed-width table of the given columns: [(key, header, format)]."""
    cells = [[h for _, h, _ in columns]] + [[("" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in columns]
                                            for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for c in cells:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))


def write_json(path, result, quiet=False):
    """The JSON file, written whole or not at all (a kill mid-write leaves the previous one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    if not quiet:
        print(f"-> {path}")


class LiveResults:
    """A benchmark's JSON, rewritten each time a point is measured: a run stopped by its time limit (gpu.sh kills
    a part at its limit) still leaves every point it finished, and "left_out" names the planned points it did not
    reach ("complete" turns true at the end). BENCH_STOP_AFTER=N (tests) makes the run wait after its N-th point,
    as a part that runs past its limit does."""

    def __init__(self, path, planned, **info):
        self.path, self.data, self.points = path, {**info, "complete": False, "left_out": list(planned)}, 0
        write_json(path, self.data, quiet=True)

    def point(self, name, **values):
        self.data.update(values)
        self.data["left_out"] = [p for p in self.data["left_out"] if p != name]
        write_json(self.path, self.data, quiet=True)
        self.points += 1
        if self.points == int(os.environ.get("BENCH_STOP_AFTER", 0)):
            print(f"BENCH_STOP_AFTER={self.points}: waiting to be stopped", flush=True)
            time.sleep(3600)

    def plan(self, names):
        """More planned points, known only once earlier ones are measured (e.g. the batch size a sweep picks)."""
        self.data["left_out"] += [n for n in names if n not in self.data["left_out"]]
        write_json(self.path, self.data, quiet=True)

    def finish(self, **values):
        self.data.update(values, complete=True, left_out=[])
        write_json(self.path, self.data)


def import_llm_blender():
    """The llm_blender module (llm-blender 0.0.2), made importable and usable under transformers >= 5.

    Two things it relies on are gone in transformers 5 (llm-blender issue "ImportError: cannot import name
    'TRANSFORMERS_CACHE' from 'transformers.utils.hub'"; the library is unmaintained):
    - transformers.utils.hub.TRANSFORMERS_CACHE, imported at module level by llm_blender.blender: point it at
      the hub cache, which is what it meant;
    - tokenizer.batch_encode_plus, called by the collators that Blender.rank uses: replace the collator's
      one helper that calls it with the same call through tokenizer(...).
    """
    import huggingface_hub
    import transformers.utils.hub
    if not hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):
        transformers.utils.hub.TRANSFORMERS_CACHE = huggingface_hub.constants.HF_HUB_CACHE
    import llm_blender
    from llm_blender.pair_ranker import collator

    def encode_texts(texts, tokenizer, max_length=None):
        p = tokenizer(texts, max_length=max_length, padding="max_length", return_tensors="pt", truncation=True)
        return p["input_ids"], p["attention_mask"]
    collator.encode_texts = encode_texts
    return llm_blender
