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

PARTS = ("rank", "train", "gen_setup", "generate")
RESULTS = {"rank": "rank.json", "train": "train.json", "generate": "generate.json"}


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


@pytest.mark.parametrize("visible, want", [(None, "0"), ("3,5", "3")])
def test_on_a_box_of_eight_gpus_each_part_sees_one(tmp_path, visible, want):
    """A stand-in nvidia-smi reports 8 H100s and a stand-in $PYTHON records the devices each part was started
    with: every part sees the first GPU only (TRL's Trainer would otherwise wrap the baseline in DataParallel)."""
    import stat
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"nvidia-smi": "#!/usr/bin/env bash\nfor i in 0 1 2 3 4 5 6 7; do echo 'NVIDIA H100 80GB HBM3, 81559 MiB, 550.54'; done\n",
               "python": f"#!/usr/bin/env bash\necho \"${{CUDA_VISIBLE_DEVICES-unset}} $1\" >> {tmp_path}/calls\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), PARTS="rank train",
               **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
    subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(tmp_path / "out")], env=env, cwd=ROOT,
                   capture_output=True, text=True, timeout=60)
    calls = [line.split() for line in open(tmp_path / "calls") if "bench_" in line]
    assert [c[1] for c in calls] == ["bench/bench_rank.py", "bench/bench_train.py"]
    assert {c[0] for c in calls} == {want}
