"""bench/gpu.sh's CPU mode: every part of the GPU benchmarks at the real shapes (vocabularies 128,005, 32,000
and 128,256, real widths; 1 layer), a handful of items, on the CPU. What fails here would fail on the GPU too,
before any timing. Slow (4 minutes on 2 shared cores at load average 1-3.5, longer under load): `make test-all`."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, require_vllm

PARTS = ("rank", "train", "gen_setup", "generate", "fsdp")
RESULTS = {"rank": "rank.json", "train": "train.json", "generate": "generate.json", "fsdp": "fsdp.json"}


@pytest.mark.slow
def test_gpu_script_cpu_check(tmp_path):
    require_vllm()  # the generation part runs vLLM's CPU engine
    out = tmp_path / "gpu_check"
    env = dict(os.environ, CPU_CHECK="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("SMALL", None)
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(out)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=3600)
    logs = {part: (out / f"{part}.log").read_text()[-3000:] if (out / f"{part}.log").exists() else "(no log)"
            for part in PARTS}
    print(p.stdout)  # the parts' summaries and times (pytest -s shows them)
    failed = re.findall(r"== (\w+) FAILED", p.stdout)
    assert p.returncode == 0 and not failed, (
        f"gpu.sh CPU check failed (exit {p.returncode}, failed parts {failed}):\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}\n"
        + "\n".join(f"--- {part}.log\n{logs[part]}" for part in failed))
    for part in PARTS:  # every part ran and finished
        assert re.search(rf"== {part} done in \d+s", p.stdout), f"part {part} did not finish:\n{p.stdout[-3000:]}"
    results = {}
    for part, name in RESULTS.items():
        path = out / name
        assert path.is_file(), f"{part}: no {name}\n{logs[part]}"
        results[part] = json.loads(path.read_text())
    # the real shapes were what ran
    rank = results["rank"]
    assert rank["ranker"] == "pairrm" and rank["parameters"] > 131e6  # the 128,005 x 1024 embedding
    assert rank["agreement_max_abs"] < 1e-3 * max(1.0, rank["score_scale"])
    train = {r["vocab_size"]: r for r in results["train"]["results"]}
    assert set(train) == {32000, 128256}
    for r in train.values():
        assert abs(r["loss_check"]["ratio"] - 2) < 1e-4
        assert {row["run"] for row in r["rows"]} == {"train_sppo.py", "TRL DPOTrainer sppo_hard (ref model)",
                                                     "TRL sppo_hard, precompute_ref_log_probs"}
    assert "vocabulary 128256, hidden 2048" in logs["gen_setup"]  # the policy that generated
    gen = results["generate"]
    assert {r["engine"] for r in gen["rows"]} == {"hf", "vllm"} and gen["dtype"] == "fp32"  # both engines alike
    assert all(r["tokens"] > 0 for r in gen["rows"])
    assert len(gen["sampling"]["seeded"]) == len(gen["sampling"]["unseeded"]) == 2 and gen["unseeded_over_seeded"] > 0
    assert [r["processes"] for r in results["fsdp"]["rows"]] == [2, 1]  # FSDP2 in 2 CPU processes, then 1
    assert all(r["complete"] and r["left_out"] == [] for r in results.values())
    assert "incomplete" not in p.stdout
    assert (out / "device.txt").is_file()


def test_a_part_cut_by_its_limit_leaves_what_it_measured(tmp_path):
    """The generation part on toy shapes, made to wait after its first point (BENCH_STOP_AFTER=1, as a part that
    runs long) under a limit: timeout stops it, its JSON keeps the HF engine's row, and gpu.sh names what the part
    did not reach."""
    require_vllm()  # the part imports generate.py's vLLM engine
    out = tmp_path / "cut"
    env = dict(os.environ, SMALL="1", PARTS="generate", GEN_S="90", BENCH_STOP_AFTER="1", PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    env.pop("CPU_CHECK", None)
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(out)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert "== generate FAILED (exit 124" in p.stdout, p.stdout[-3000:]
    assert "== generate: incomplete; left out: vllm, vllm seeded round 1, vllm unseeded round 1" in p.stdout
    result = json.loads((out / "generate.json").read_text())
    assert not result["complete"] and [r["engine"] for r in result["rows"]] == ["hf"]
    assert result["rows"][0]["tokens"] > 0 and result["left_out"][0] == "vllm"
    assert p.returncode == 1  # a failed part fails the script, after the others ran


def stand_in_gpus(tmp_path, gpus, visible, parts):
    """gpu.sh with a stand-in nvidia-smi that reports `gpus` H100s and a stand-in $PYTHON that records the devices
    each part was started with and its arguments: (its stdout, [[devices, script, args...] of each part])."""
    import stat
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    h100 = "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54"
    scripts = {"nvidia-smi": f"#!/usr/bin/env bash\nfor i in $(seq {gpus}); do echo '{h100}'; done\n",
               "python": f"#!/usr/bin/env bash\necho \"${{CUDA_VISIBLE_DEVICES-unset}} $*\" >> {tmp_path}/calls\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SMALL", "CPU_CHECK")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), PARTS=parts,
               **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path / "out")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return p.stdout, [line.split() for line in calls if "bench_" in line]


@pytest.mark.parametrize("visible, want", [(None, "0"), ("3,5", "3")])
def test_on_a_box_of_eight_gpus_each_part_sees_one(tmp_path, visible, want):
    """On 8 stand-in H100s every one-GPU part sees the first GPU only (TRL's Trainer would otherwise wrap the
    baseline in DataParallel)."""
    _, calls = stand_in_gpus(tmp_path, 8, visible, "rank train")
    assert [c[1] for c in calls] == ["bench/bench_rank.py", "bench/bench_train.py"]
    assert {c[0] for c in calls} == {want}


@pytest.mark.parametrize("gpus, visible, want", [(8, None, "0,1,2,3,4,5,6,7"), (8, "3,5", "3,5"), (8, "3", None),
                                                 (1, None, None)])
def test_the_fsdp_part_takes_every_visible_gpu_or_says_why_not(tmp_path, gpus, visible, want):
    """The FSDP part runs bench_fsdp_train.py once, on every GPU the user made visible (all, without
    CUDA_VISIBLE_DEVICES) and with as many processes, while the one-GPU parts keep the first; with fewer than 2
    visible it is skipped, in one line that says so."""
    stdout, calls = stand_in_gpus(tmp_path, gpus, visible, "train fsdp")
    assert calls[0][:2] == [(visible or "0").split(",")[0], "bench/bench_train.py"]
    fsdp = [c for c in calls if c[1] == "bench/bench_fsdp_train.py"]
    if want is None:
        assert fsdp == [] and "== fsdp: skipped: 1 GPU visible, FSDP2 across GPUs needs 2 or more" in stdout
    else:
        assert len(fsdp) == 1 and fsdp[0][0] == want
        assert fsdp[0][fsdp[0].index("--nproc") + 1] == str(len(want.split(",")))
        assert fsdp[0][fsdp[0].index("--dtype") + 1] == "bf16" and "skipped" not in stdout


def test_the_fsdp_part_runs_on_two_cpu_processes(tmp_path):
    """SMALL=1 on a CPU: the FSDP part trains a toy policy under torchrun in 2 processes (gloo), then in 1, through
    the script, and writes what train_sppo.py reported: the same global batches (so the same tokens) in both."""
    out = tmp_path / "small"
    env = dict(os.environ, SMALL="1", PARTS="fsdp", PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("CPU_CHECK", None)
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(out)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0 and re.search(r"== fsdp done in \d+s", p.stdout), p.stdout[-3000:] + p.stderr[-2000:]
    result = json.loads((out / "fsdp.json").read_text())
    assert result["complete"] and result["left_out"] == [] and result["dtype"] == "fp32"
    two, one = result["rows"]
    assert (two["processes"], one["processes"], two["device"]) == (2, 1, "cpu")
    assert two["steps"] == one["steps"] == 2 and two["tokens"] == one["tokens"] > 0
    for r in (two, one):
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb_per_process"] > 0 and r["peak_memory_kind"] == "RSS"
    assert result["speedup"] > 0
