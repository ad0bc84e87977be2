"""The benchmarks' multi-process and direct-vLLM modes on tiny shapes: bench_train.py's --nprocs (train_sppo.py
under torchrun with FSDP2, TRL's Trainer with DDP, both on gloo) and bench_generate.py --mode direct (generate.py
against vLLM called directly). What they must get right is what is compared: the processes and threads each run
had, the same optimizer steps on both sides, the same prompt ids; the timings themselves are not checked."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, read_jsonl, require_vllm, write_jsonl


def bench(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=1800)
    assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_train_bench_one_and_two_processes(tmp_path):
    """8 pairs in steps of 4 pairs: 2 optimizer steps on both sides whatever the number of processes (TRL's
    gradient accumulation must shrink with the processes); 2 cores shared out (1 process x 2 threads, 2 x 1), as
    each process's torch saw it; every rank's peak memory; the prompts taken from --prompts."""
    prompts = [{"id": f"p{i}", "prompt": f"Write line {i} of a short poem about the sea."} for i in range(8)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    out, work = tmp_path / "train.json", tmp_path / "work"
    bench("bench_train.py", "--model", "tiny", "--vocab-sizes", "600", "--prompts", tmp_path / "prompts.jsonl",
          "--n-prompts", 8, "--batch-size", 4, "--micro-batch-size", 2, "--min-tokens", 8, "--max-tokens", 24,
          "--max-length", 96, "--runs", "ours,trl", "--nprocs", "1,2", "--cores", 2, "--workdir", work, "--out", out)
    result = json.loads(out.read_text())
    assert result["complete"]
    (r,) = result["results"]
    assert abs(r["loss_check"]["ratio"] - 2) < 1e-4 and r["loss_check"]["trl_extra"]["tokens"] == 0
    assert [x["prompt"] for x in read_jsonl(work / "600" / "ranked.jsonl")] == [x["prompt"] for x in prompts]
    rows = {(x["processes"], x["run"]): x for x in r["rows"]}
    ours, trl = "train_sppo.py", "TRL DPOTrainer sppo_hard (ref model)"
    assert set(rows) == {(1, ours), (1, trl), (2, ours), (2, trl)}
    how = {(1, ours): "one process", (1, trl): "NO", (2, ours): "FSDP2 on gloo", (2, trl): "MULTI_CPU on gloo"}
    for key, row in rows.items():
        n = key[0]
        (run,) = row["all"]  # one repeat
        assert run["distributed"] == how[key]
        assert run["torch_threads"] == 2 // n  # what torch in rank 0 ran with
        assert run["steps"] == 2, f"{key}: {run['steps']} optimizer steps for 8 pairs in steps of 4"
        assert len(run["peak_rss_mb"]) == len(run["rss_after_imports_mb"]) == n
        assert all(p > a > 0 for p, a in zip(run["peak_rss_mb"], run["rss_after_imports_mb"]))
        # ours against TRL at the same number of processes, from the seconds alone
        mine = rows[n, ours]["all"][0]["seconds"]
        assert row["ours_speedup"] == pytest.approx(run["seconds"] / mine, rel=1e-9)
        assert row["over_one_process"] == pytest.approx(rows[1, key[1]]["seconds"] / run["seconds"], rel=1e-9)


@pytest.mark.slow
def test_generate_bench_direct(world, tmp_path):
    """generate.py and vLLM called directly on the tiny policy: both sides ran, were given the same prompt ids (the
    bench refuses otherwise), sampled K answers of each prompt, and the ratios are those of the rows' medians."""
    require_vllm()
    out = tmp_path / "generate.json"
    bench("bench_generate.py", "--mode", "direct", "--model", world / "policy", "--prompts", world / "prompts.jsonl",
          "--n-prompts", 4, "--k", 2, "--max-tokens", 8, "--repeats", 1, "--out", out)
    result = json.loads(out.read_text())
    assert result["complete"] and [x["side"] for x in result["rows"]] == ["generate.py", "vllm direct"]
    for row in result["rows"]:
        assert 0 < row["tokens"] <= 4 * 2 * 8 and row["process_s"] > row["start_and_generate_s"] > 0
        assert row["tokens_per_s_process"] == pytest.approx(row["tokens"] / row["process_s"], abs=0.06)
    ours, theirs = result["rows"]
    assert theirs["start_and_generate_s"] == pytest.approx(theirs["start_s"] + theirs["generate_s"], abs=0.011)
    assert result["ours_over_direct_process"] == pytest.approx(
        ours["tokens_per_s_process"] / theirs["tokens_per_s_process"], abs=0.006)
    assert result["direct_kv_cache_gb"] > 0  # on a CPU vLLM direct gets the KV cache generate.py sizes
