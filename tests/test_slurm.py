"""The loop past one box: under SLURM, shards over every GPU of every node and one torchrun per node
(c10d), and TP GPUs per generation engine. A spy shows where run_loop.sh places each process (1 and 2 nodes,
TP 1, 2, 4); a real 2-node SLURM cluster on one machine (examples/slurm/local-cluster.sh) runs the tiny loop and
gives the same files and weights as one node."""
import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT

# Stand-ins for $PYTHON, srun and scontrol. The spy records each stage's arguments, devices and the srun options
# it was started under (SPY_SRUN), and writes an empty output so the loop goes on; the loop's own settings check
# (common.py) runs for real. The fake srun runs its command once, here; the fake scontrol knows FAKE_NODES.
SPY = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["common.py"]:
    os.execv(sys.executable, [sys.executable, *args])
with open(os.environ["SPY_LOG"], "a") as f:
    f.write(json.dumps({{"args": args, "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "cache": os.environ.get("VLLM_CACHE_ROOT"), "srun": os.environ.get("SPY_SRUN"),
                        "local_addr": os.environ.get("PET_LOCAL_ADDR"),
                        "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT")}}) + "\\n")
out = args[args.index("--out") + 1]
if any(a.endswith("train_sppo.py") for a in args):
    os.makedirs(out)
else:
    open(out, "w").close()
"""
SRUN = """#!/usr/bin/env bash
opts=(); while [[ $1 == -* ]]; do opts+=("$1"); shift; done
node=${FAKE_NODES%%,*}; for o in "${opts[@]}"; do [[ $o == --nodelist=* ]] && node=${o#--nodelist=}; done
SPY_SRUN="${opts[*]}" SLURMD_NODENAME=$node exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") tr , '\\n' <<< "$FAKE_NODES" ;;
    "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"; echo "   NodeAddr=10.0.0.${3#a} NodeHostName=$3" ;;
    *) exit 1 ;;
esac
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def spy_loop(tmp_path, nodes=None, config="tiny", **env):
    """run_loop.sh with the spy engine; nodes: a list of node names to fake a SLURM job over them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "python", SPY.format(python=sys.executable))
    executable(bin_dir / "srun", SRUN)
    executable(bin_dir / "scontrol", SCONTROL)
    log = tmp_path / "spy.jsonl"
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE", "VLLM_CACHE"))}
    e.update(PYTHON=str(bin_dir / "python"), SPY_LOG=str(log), OUT=str(tmp_path / "run"), ITERS="1",
             HOME=str(tmp_path / "home"), XDG_CACHE_HOME="", WORLD=str(tmp_path / "world"),
             PATH=f"{bin_dir}:{os.environ['PATH']}")
    e.update(env)
    if nodes:
        e.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="a[1-2]", FAKE_NODES=",".join(nodes))
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), f"configs/{config}.env"], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in open(log)] if log.exists() else []
    return p, calls


def shards_of(calls, script):
    """(shard, node, devices, args) of each call of one script, in shard order."""
    mine = [c for c in calls if any(a.endswith(script) for a in c["args"])]
    rows = []
    for c in mine:
        node = next((o.split("=", 1)[1] for o in (c["srun"] or "").split() if o.startswith("--nodelist=")), None)
        rows.append((c["args"][c["args"].index("--shard") + 1], node, c["devices"], c["args"]))
    return sorted(rows, key=lambda r: int(r[0].split("/")[0]))


VISIBLE = ["4", "5", "6", "7", "0", "1", "2", "3"]  # the user's order, not 0-7


@pytest.mark.parametrize("n_nodes", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_over_every_gpu_of_every_node_with_tp_gpus_per_engine(tmp_path, n_nodes, tp):
    nodes = ["a1", "a2"][:n_nodes]
    p, calls = spy_loop(tmp_path, nodes=nodes, GPUS="8", TP=str(tp), CUDA_VISIBLE_DEVICES=",".join(VISIBLE))
    assert p.returncode == 0, p.stderr
    # generation: 8 / TP engines per node, node by node; engine j of a node has the j-th TP of its devices
    want = [(node, ",".join(VISIBLE[j * tp:(j + 1) * tp])) for node in nodes for j in range(8 // tp)]
    gen = shards_of(calls, "generate.py")
    assert [(s, n, d) for s, n, d, _ in gen] == [(f"{i}/{len(want)}", *w) for i, w in enumerate(want)]
    # each engine its own vLLM cache: two nodes' "device 0" must not share one in a shared home directory
    caches = [c["cache"] for c in calls if any(a.endswith("generate.py") for a in c["args"])]
    assert sorted(os.path.basename(c) for c in caches) == sorted(f"{node}-device-{d}" for node, d in want)
    for *_, args in gen:
        assert ("--tensor-parallel-size" in args) == (tp > 1)
        if tp > 1:
            assert args[args.index("--tensor-parallel-size") + 1] == str(tp)
    # ranking: one GPU per shard whatever TP is
    rank = shards_of(calls, "rank.py")
    assert [(n, d) for _, n, d, _ in rank] == [(node, d) for node in nodes for d in VISIBLE]
    assert [s for s, *_ in rank] == [f"{i}/{8 * n_nodes}" for i in range(8 * n_nodes)]
    # training: one srun task per node, each a torchrun of 8 processes on all the node's devices, meeting at
    # the first node's address
    (train,) = [c for c in calls if any(a.endswith("train_sppo.py") for a in c["args"])]
    args = train["args"]
    assert train["devices"] == ",".join(VISIBLE)
    assert args[args.index("--nproc_per_node") + 1] == "8"
    assert f"--nodes={n_nodes}" in train["srun"].split() and f"--ntasks={n_nodes}" in train["srun"].split()
    assert "--kill-on-bad-exit=1" in train["srun"].split()  # a failed node ends the step, not the group's timeout
    assert train["local_addr"] == "10.0.0.1"  # torchrun advertises its node's NodeAddr (the first node's here)
    assert args[args.index("--nnodes") + 1] == str(n_nodes)
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert args[args.index("--rdzv-endpoint") + 1].split(":")[0] == "10.0.0.1"
    assert "--standalone" not in args


def test_a_job_with_slurm_gpus_gives_each_step_its_own_gpus_and_cpus(tmp_path):
    """A job given GPUs by SLURM (--gres=gpu:8: SLURM_JOB_GPUS set) on 64-CPU nodes, TP=2: each generation step asks
    for its 2 GPUs and 64 / 4 CPUs and only those (--exact), each ranking step for 1 GPU and 8 CPUs, training for
    the node's 8 GPUs and 64 CPUs; SLURM sets each step's CUDA_VISIBLE_DEVICES (the fake srun passes on the job's
    list), so the loop pins none itself, and every engine of a node keeps its own vLLM cache."""
    p, calls = spy_loop(tmp_path, nodes=["a1", "a2"], GPUS="8", TP="2", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
                        SLURM_JOB_GPUS="0,1,2,3,4,5,6,7", SLURM_CPUS_ON_NODE="64")
    assert p.returncode == 0, p.stderr
    for script, gpus, cpus, n in (("generate.py", 2, 16, 8), ("rank.py", 1, 8, 16)):
        steps = shards_of(calls, script)
        assert len(steps) == n
        for _, node, devices, _ in steps:
            assert devices == "0,1,2,3,4,5,6,7"  # the job's, as the fake srun leaves it: not narrowed by the loop
        srun = [c["srun"].split() for c in calls if any(a.endswith(script) for a in c["args"])]
        assert all({"--exact", f"--gres=gpu:{gpus}", f"--cpus-per-task={cpus}"} <= set(o) and "--overlap" not in o
                   for o in srun), srun
    caches = sorted(c["cache"] for c in calls if any(a.endswith("generate.py") for a in c["args"]))
    assert [os.path.basename(c) for c in caches] == [f"{n}-slot-{j}" for n in ("a1", "a2") for j in range(4)]
    (train,) = [c for c in calls if any(a.endswith("train_sppo.py") for a in c["args"])]
    assert {"--exact", "--gres=gpu:8", "--cpus-per-task=64"} <= set(train["srun"].split())


def test_tp_on_one_machine_without_slurm(tmp_path):
    p, calls = spy_loop(tmp_path, GPUS="4", TP="2")
    assert p.returncode == 0, p.stderr
    gen = shards_of(calls, "generate.py")
    assert [(s, n, d) for s, n, d, _ in gen] == [("0/2", None, "0,1"), ("1/2", None, "2,3")]
    assert [d for _, _, d, _ in shards_of(calls, "rank.py")] == ["0", "1", "2", "3"]
    assert all(c["srun"] is None for c in calls)


@pytest.mark.parametrize("gpus, tp", [("8", "3"), ("0", "2")])
def test_tp_that_does_not_divide_the_gpus_is_refused(tmp_path, gpus, tp):
    p, calls = spy_loop(tmp_path, GPUS=gpus, TP=tp)
    assert p.returncode == 2 and calls == []
    assert f"TP={tp} needs GPUS a multiple of it (GPUS={gpus})" in p.stderr


def test_slurm_0_keeps_one_machine_inside_a_job(tmp_path):
    p, calls = spy_loop(tmp_path, nodes=["a1", "a2"], GPUS="2", SLURM="0")
    assert p.returncode == 0, p.stderr
    assert all(c["srun"] is None for c in calls)
    assert "--standalone" in next(c for c in calls if any(a.endswith("train_sppo.py") for a in c["args"]))["args"]


def test_llama3_70b_config_under_sbatch_N_4(tmp_path):
    """configs/llama3-70b.env under `sbatch -N 4`: 8 engines of 4 GPUs, 32 ranking shards, 32 training processes
    whose micro-batch of 1 divides the global batch of 64 (train_sppo.py's own check)."""
    import train_sppo
    nodes = ["a1", "a2", "a3", "a4"]
    p, calls = spy_loop(tmp_path, nodes=nodes, config="llama3-70b", ITERS="1", N_PROMPTS="16")
    assert p.returncode == 0, p.stderr
    gen = shards_of(calls, "generate.py")
    assert [(n, d) for _, n, d, _ in gen] == [(n, d) for n in nodes for d in ("0,1,2,3", "4,5,6,7")]
    assert all(args[args.index("--tensor-parallel-size") + 1] == "4" for *_, args in gen)
    assert len(shards_of(calls, "rank.py")) == 32
    (train,) = [c for c in calls if any(a.endswith("train_sppo.py") for a in c["args"])]
    args = train["args"][train["args"].index("train_sppo.py") + 1:]
    nnodes, nproc = (int(train["args"][train["args"].index(f) + 1]) for f in ("--nnodes", "--nproc_per_node"))
    parsed = train_sppo.parser().parse_args(args)
    assert (parsed.batch_size, nnodes * nproc) == (64, 32)
    assert train_sppo.check_args(parsed, nnodes * nproc) == 1
    assert parsed.gradient_checkpointing and parsed.dtype == "bf16"


# -----------------------------------------------------------------------------
# A real 2-node cluster on one machine

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """munged, slurmctld and two slurmd (n1, n2) on localhost, from examples/slurm; stopped by their pids at the
    end, pass or fail. Installs the packages when missing (CI); without them and root elsewhere, skips."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the SLURM tests as root (SlurmUser=root)")
        pytest.skip("the local SLURM cluster needs root")
    p = subprocess.run(["bash", os.path.join(ROOT, "examples/slurm/install.sh")], capture_output=True, text=True)
    if p.returncode != 0:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"cannot install SLURM: {p.stderr[-500:]}")
    d = tmp_path_factory.mktemp("slurm")
    script = os.path.join(ROOT, "examples/slurm/local-cluster.sh")
    try:
        p = subprocess.run(["bash", script, "start", str(d)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        yield d
    finally:
        pids = [int(f.read_text()) for f in d.glob("*.pid")]
        subprocess.run(["bash", script, "stop", str(d)], timeout=120)
        alive = [pid for pid in pids if running(pid)]
        assert not alive, f"daemons still running after stop: {alive}"


def running(pid):
    """Alive and not a zombie (a stopped daemon can wait a moment for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# $PYTHON on the cluster: records the node each stage ran on, and the first time generate.py starts on n2 it is
# killed after its first batch is written (common.fault_point), as a node lost mid-stage would leave it.
NODE_SPY = """#!/usr/bin/env bash
echo "${{SLURMD_NODENAME:-none}} $*" >> {log}
if [ "${{SLURMD_NODENAME-}}" = n2 ] && [ "$1" = generate.py ] && [ ! -e {killed} ]; then
    touch {killed}; export SPPO_FAULT=partial-written
fi
exec {python} "$@"
"""

TINY = dict(SPPO_PROGRESS="0", OMP_NUM_THREADS="1", ITERS="2", N_PROMPTS="8", K="3", MAX_TOKENS="32",
            GEN_ARGS="--engine hf", BATCH="8", MICRO_BATCH="8", EPOCHS="1")


def same_text(a, b, out_a, out_b):
    """The two files hold the same records, once each run's own OUT is written alike."""
    assert a.read_text().replace(str(out_a), "OUT") == b.read_text().replace(str(out_b), "OUT")


@pytest.mark.slow
def test_two_node_loop_equals_one_node_and_a_lost_node_resumes(world, cluster, tmp_path):
    from safetensors.torch import load_file
    import torch
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "CUDA_VISIBLE"))}
    # One node, two processes per stage (2 shards, torchrun --standalone of 2): the same split of the work as two
    # nodes of one each.
    one = tmp_path / "one"
    p = subprocess.run(["bash", "run_loop.sh", "configs/tiny.env"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(base, **TINY, PYTHON=sys.executable, WORLD=str(world), OUT=str(one), GPUS="2"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    spy, log, killed = tmp_path / "python", tmp_path / "nodes.log", tmp_path / "killed"
    executable(spy, NODE_SPY.format(log=log, killed=killed, python=sys.executable))
    two = tmp_path / "two"
    env = dict(base, **TINY, PYTHON=str(spy), WORLD=str(world), OUT=str(two), GPUS="1",
               SLURM_CONF=str(cluster / "slurm.conf"))

    def sbatch(name):
        job_out = tmp_path / f"{name}.out"
        p = subprocess.run(["sbatch", "--wait", "-N", "2", "-o", str(job_out), "examples/slurm/sppo.sbatch",
                            "configs/tiny.env"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        return p, job_out.read_text()

    # n2's generation shard is killed: the stage fails in one line naming its log, and nothing is merged
    p, text = sbatch("lost")
    assert p.returncode != 0 and killed.exists(), text
    shard_log = two / "iter1" / "logs" / "generate.1.log"
    assert f"run_loop: stage 'generate' failed (iteration 1); see {shard_log}" in text
    assert not (two / "iter1" / "generated.jsonl").exists()
    # the rerun resumes n2's shard from what it had written, and finishes both iterations
    p, text = sbatch("rerun")
    assert p.returncode == 0, text
    resumed = shard_log.read_text()
    assert "in shard 1/2, 0 already done" not in resumed and "in shard 1/2," in resumed, resumed
    ran = [line.split(" ", 1) for line in log.read_text().splitlines()]
    for script in ("generate.py", "rank.py"):
        assert {node for node, cmd in ran if cmd.startswith(script)} == {"n1", "n2"}
    assert {node for node, cmd in ran if "torch.distributed.run" in cmd} == {"n1", "n2"}  # one torchrun per node

    for t in (1, 2):
        for name in ("generated.jsonl", "ranked.jsonl"):
            same_text(one / f"iter{t}" / name, two / f"iter{t}" / name, one, two)
        w1 = load_file(one / f"iter{t}" / "checkpoint" / "model.safetensors")
        w2 = load_file(two / f"iter{t}" / "checkpoint" / "model.safetensors")
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k])


def test_memory_arithmetic_counts_the_published_parameters():
    """bench/bench_cluster_memory.py's parameter counts are the models' published ones (their model cards), and
    its optimizer-step temporary is 4 bytes a parameter over the GPUs, worked by hand for Llama-3-70B over 16."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_cluster_memory as b
    assert b.parameters(b.MODELS["Meta-Llama-3-70B-Instruct"]) == 70_553_706_496
    assert b.parameters(b.MODELS["gemma-2-27b-it"]) == 27_227_128_320
    assert b.parameters(b.MODELS["Mistral-7B-Instruct-v0.2"]) == 7_241_732_096
    row = next(r for r in b.rows() if r["model"] == "Meta-Llama-3-70B-Instruct")
    assert row["foreach_temporary_gb"]["16"] == pytest.approx(4 * 70_553_706_496 / 16 / 1e9)  # 17.6 GB
    assert row["micro_batch"] == {"1": 1, "8": 1, "16": 1, "32": 1}


def test_per_gpu_memory_worked_by_hand():
    """bench_memory.per_gpu for Llama-3-70B over 16 GPUs at micro-batch 1 (2 rows of 1,024 tokens), each term from
    the config (vocabulary 128,256, hidden 8,192, 80 layers, MLP 28,672, KV width 1,024): the fp32 weights,
    gradients and RMSprop state sharded (12 bytes a parameter / 16) plus the forward's gathered bf16 groups and
    activations. The step, one tensor at a time, adds one shard of the embeddings after those are freed, so it is
    not the peak; with foreach its temporary, 4 bytes a parameter / 16, would be: 16 bytes a parameter / 16."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_cluster_memory as b
    import bench_memory
    m, n, gb = dict(b.MODELS["Meta-Llama-3-70B-Instruct"], micro=1), 70_553_706_496, 1e9
    layer = 8192 * (2 * 8192 + 2 * 1024) + 3 * 8192 * 28672 + 2 * 8192        # linear weights + 2 norms
    acts = (2 * (2 * 128256 * 8192 + 2 * layer)                                 # bf16 root + two layers
            + 80 * 2 * 1024 * 8192 * 4                                          # each layer's fp32 input
            + 8 * 2 * 1024 * 28672 * 2                                          # one layer's MLP recomputed
            + 2 * 128256 * 8192 + 3 * 2**26)                                    # lm_head bf16 + logit chunks
    assert bench_memory.per_gpu(m, 16) == pytest.approx((12 * n / 16 + acts) / gb)         # 69.2 GB
    assert bench_memory.per_gpu(m, 16) < 80  # 2 nodes of 8 x 80 GB hold it, by the arithmetic
    assert bench_memory.per_gpu(m, 16, foreach=True) == pytest.approx(16 * n / 16 / gb)   # 70.6 GB
    row = next(r for r in b.rows() if r["model"] == "Meta-Llama-3-70B-Instruct")
    assert row["gpu_gb"]["16"] == pytest.approx((12 * n / 16 + acts) / gb)
    for name, r in bench_memory.RECIPES.items():  # one process: recipe_memory's total, whatever the step
        assert bench_memory.per_gpu(r, 1) == pytest.approx(bench_memory.recipe_memory(r)["total"]), name


def test_hardware_arithmetic_worked_by_hand():
    """bench/bench_hardware.py (docs/hardware.md's table) for Mistral-7B on 8 H100s, each term worked by hand from
    the published parameter count (7,241,732,096) and the stated assumptions: 20,000 prompts, K = 5, 2048 new tokens,
    training sequences of 1024 tokens, PairRM 0.435B on 20 ordered pairs of 2048 tokens, 989 TFLOP/s per GPU at 40%
    (10% while decoding), 11 JSONL bytes a sampled token."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_cluster_memory
    import bench_hardware
    r = bench_hardware.iteration(bench_cluster_memory.MODELS["Mistral-7B-Instruct-v0.2"], 8)
    n, peak = 7_241_732_096, 8 * 989e12
    assert r["minutes"]["generate"] == pytest.approx(2 * n * 20_000 * 5 * 2048 / (0.1 * peak) / 60)  # 62.5 min
    assert r["minutes"]["generate"] == pytest.approx(62.5, abs=0.05)
    assert r["minutes"]["rank"] == pytest.approx(3.75, abs=0.01)     # 7.13e17 FLOPs at 3.16e15 FLOP/s
    assert r["minutes"]["train"] == pytest.approx(15.6, abs=0.05)    # 10 x n x 40,000 x 1024 = 2.97e18 FLOPs
    assert r["checkpoint_gb"] == pytest.approx(14.48, abs=0.01) and r["state_gb"] == pytest.approx(57.93, abs=0.01)
    assert r["host_gb_rank0"] == pytest.approx(28.97, abs=0.01)
    assert r["jsonl_gb"] == pytest.approx(2 * 20_000 * 5 * 2048 * 11 / 1e9)  # 4.5 GB: generated + ranked
