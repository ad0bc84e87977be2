"""Faults and bad input: a kill at any point loses no finished work and leaves no half-written file that a
later stage trusts; every bad input is a one-line error naming file, line and field, with no output.

Kills are placed exactly with the SPPO_FAULT test hook (common.fault_point): the stage SIGKILLs itself at a
named point, e.g. SPPO_FAULT=partial-written:2 after its second batch reached OUT.partial (rank/partial-written: in
rank.py only; with SPPO_FAULT_PAUSE the stage waits there for the test to kill its whole loop). A killed run is
rerun until it completes; its output must equal that of an uninterrupted run with the same seeds.
The bad inputs are real files under tests/bad_inputs/, listed with their expected errors in cases.json.
"""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_jsonl, run_stage, write_jsonl
from test_rank import assert_same, logit_tol
from test_train import assert_same_weights

BAD = os.path.join(ROOT, "tests", "bad_inputs")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # much faster for the tiny models on a busy machine
STAGES = {"generate": "generate.py", "rank": "rank.py", "train": "train_sppo.py", "evaluate": "evaluate.py"}


def stage(name, *args, fault=None, check=True):
    env = dict(ONE_THREAD, **({"SPPO_FAULT": fault} if fault else {}))
    p = run_stage(STAGES[name], *args, check=False, env=env)
    if fault:
        assert p.returncode == -signal.SIGKILL, f"SPPO_FAULT={fault} was not reached ({p.returncode}):\n{p.stderr[-2000:]}"
    elif check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def gen(world, out, *extra, fault=None, check=True, limit=8):
    # --hf-batch-size 6 with K=3: two prompts per generate() call, each call's records saved as a batch
    return stage("generate", "--model", world / "policy", "--prompts", world / "prompts.jsonl", "--out", out,
                 "--engine", "hf", "--limit", limit, "--k", 3, "--max-tokens", 32, "--hf-batch-size", 6, *extra,
                 fault=fault, check=check)


def rank(world, inp, out, *extra, fault=None, check=True):
    return stage("rank", "--in", inp, "--out", out, "--ranker", world / "ranker", "--write-every", 2, *extra,
                 fault=fault, check=check)


TRAIN = ["--eta", 5, "--lr", 3e-4, "--optimizer", "adamw", "--warmup-ratio", 0, "--batch-size", 4,
         "--micro-batch-size", 4, "--max-length", 96, "--max-prompt-length", 48, "--epochs", 2]


def train(world, data, out, *extra, fault=None, check=True):
    return stage("train", "--model", world / "policy", "--data", data, "--out", out, *TRAIN, *extra,
                 fault=fault, check=check)


def assert_same_ranked(world, a, b):
    """Equal records; PairRM's numbers to fp32 rounding (a resumed run may batch other pairs together)."""
    assert_same(a, b, logit_tol(world, [r["logits"] for r in b]))


def leftovers(out):
    return [p for p in (f"{out}.partial", f"{out}.tmp") if os.path.exists(p)]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """Uninterrupted runs of generate and rank on 8 prompts: what every interrupted run must end with."""
    d = tmp_path_factory.mktemp("reference")
    gen(world, d / "gen.jsonl")
    rank(world, d / "gen.jsonl", d / "ranked.jsonl")
    return d


# -----------------------------------------------------------------------------
# kills: rerun after each, and the result equals an uninterrupted run

SLOW = pytest.mark.slow


@pytest.mark.parametrize("faults", [
    ["partial-written:1", "torn-write:2"],  # after a saved batch; halfway through writing a line
    pytest.param(["before-rename", "after-rename"], marks=SLOW),  # OUT.tmp complete; OUT in place, OUT.partial not removed
    pytest.param(["partial-written:3", "after-rename"], marks=SLOW),
], ids="+".join)
def test_generate_killed_then_resumed(world, reference, tmp_path, faults):
    out = tmp_path / "gen.jsonl"
    partial = f"{out}.partial"
    for fault in faults:
        gen(world, out, fault=fault)
        if fault == "partial-written:1":
            assert not out.exists() and len(read_jsonl(partial)) == 2
            # the next stage never reads an unfinished output: only OUT.partial exists, and it says so
            p = rank(world, out, tmp_path / "ranked.jsonl", check=False)
            assert p.returncode == 2 and "unfinished output" in p.stderr
            assert_other_settings_refused(world, out, tmp_path)
        if fault == "torn-write:2":  # one more batch saved, then a kill halfway through the next one's last line
            assert open(partial).read().count("\n") == 5 and not open(partial).read().endswith("\n")
        if fault == "before-rename":
            assert not out.exists() and os.path.exists(f"{out}.tmp")
        if fault == "after-rename":
            assert out.exists() and os.path.exists(partial)
    gen(world, out)
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [r["id"] for r in read_jsonl(reference / "gen.jsonl")]  # none lost or doubled
    assert recs == read_jsonl(reference / "gen.jsonl")
    assert not leftovers(out)


@pytest.mark.parametrize("faults", [
    ["partial-written:2", "after-rename"],
    pytest.param(["torn-write:1", "before-rename"], marks=SLOW),
], ids="+".join)
def test_rank_killed_then_resumed(world, reference, tmp_path, faults):
    inp, out = reference / "gen.jsonl", tmp_path / "ranked.jsonl"
    for fault in faults:
        rank(world, inp, out, fault=fault)
        if fault == "partial-written:2":
            assert len(read_jsonl(f"{out}.partial")) == 4
            assert_other_rank_settings_refused(world, reference, out, tmp_path)
    p = rank(world, inp, out)
    assert "already done" in p.stderr
    assert_same_ranked(world, read_jsonl(out), read_jsonl(reference / "ranked.jsonl"))
    assert not leftovers(out)


@pytest.mark.parametrize("faults", [
    ["train-step:2", "checkpoint-weights"],  # mid-training: only OUT.tmp exists; then weights saved, tokenizer not
    pytest.param(["checkpoint-written"], marks=SLOW),  # all saved, not yet renamed
], ids="+".join)
def test_train_killed_then_rerun(world, reference, tmp_path, faults):
    from safetensors.torch import load_file
    data = reference / "ranked.jsonl"
    ref = tmp_path / "ref"
    train(world, data, ref)
    out = tmp_path / "ckpt"
    for fault in faults:
        train(world, data, out, fault=fault)
        assert not out.exists() and (tmp_path / "ckpt.tmp" / "train_log.jsonl").exists()
        if fault == "checkpoint-weights":
            names = os.listdir(tmp_path / "ckpt.tmp")
            assert "model.safetensors" in names and not any(n.startswith("tokenizer") for n in names), names
    if "checkpoint-weights" in faults:  # the next stage never loads an unfinished checkpoint
        p = gen(world, tmp_path / "g.jsonl", "--model", out, check=False)
        assert p.returncode == 2 and "no such checkpoint directory" in p.stderr
    train(world, data, out)
    assert not os.path.exists(f"{out}.tmp")
    no_speed = lambda path: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(path)]  # noqa: E731
    assert no_speed(out / "train_log.jsonl") == no_speed(ref / "train_log.jsonl")
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "same seed, same weights"
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    if "checkpoint-written" in faults:
        gen(world, tmp_path / "g.jsonl", "--model", out, limit=2)  # loadable: the next iteration samples from it
    p = train(world, data, out, "--seed", 7, check=False)  # a finished checkpoint of other settings
    assert p.returncode == 2 and "was made with seed=42, this run has seed=7" in p.stderr


def loop_env(world, out, **extra):
    # 2 steps of 4 prompts at lr 1e-3 without warm-up: iteration 1's checkpoint is not the base (test_loop.py)
    return dict(os.environ, SPPO_PROGRESS="0", PYTHON=sys.executable, WORLD=str(world), OUT=str(out), ITERS="2",
                N_PROMPTS="8", K="3", MAX_TOKENS="32", GEN_ARGS="--engine hf --hf-batch-size 6",
                RANK_ARGS="--write-every 2", BATCH="4", MICRO_BATCH="4", EPOCHS="1", WARMUP="0", LR="1e-3",
                OMP_NUM_THREADS="1", **extra)


def run_loop(env, check=True):
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"run_loop.sh failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def kill_loop_when(env, ready, hang=1800):
    """Start run_loop.sh in its own process group and SIGKILL the whole group (the loop and its running
    stage, as a scheduler or a lost machine does) as soon as ready() is true. ready() must stay true once it
    is (a file that exists, a count that grows): a point that passes in an instant is reached with the
    SPPO_FAULT_PAUSE hook instead. `hang` only bounds a stuck run: the waits are for events, not times."""
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + hang
    while proc.poll() is None and not ready():
        assert time.time() < deadline, f"run_loop.sh did not reach the kill point in {hang} s"
        time.sleep(0.02)
    assert proc.poll() is None, "run_loop.sh finished before the kill point"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The loop's lock (OUT/.lock) is held by every process of the group until it has exited, and a stage with a
    # model in memory and threads takes a moment to: wait for it, or a rerun started at once finds it held.
    with open(os.path.join(env["OUT"], ".lock"), "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                break
            except BlockingIOError:
                assert time.time() < deadline, f"the killed loop's processes still hold its lock after {hang} s"
                time.sleep(0.05)


def kill_loop_at(env, point, tmp_path):
    """kill_loop_when, the moment a stage reaches the SPPO_FAULT point (STAGE/NAME or NAME): the stage stops
    there (SPPO_FAULT_PAUSE) until the whole loop is killed, so even an instant's window is hit every time."""
    paused = tmp_path / f"paused-{point.replace('/', '-')}"
    paused.unlink(missing_ok=True)
    kill_loop_when(dict(env, SPPO_FAULT=point, SPPO_FAULT_PAUSE=str(paused)), paused.exists)


def lines(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def assert_same_loop_outputs(world, a, b, iters=(1, 2)):
    """Two loops' outputs: the same samples, the same ranks to fp32 rounding, the same weights as
    test_train.assert_same_weights compares them (iteration t starts from iteration t-1's checkpoint)."""
    def records(out, name):  # iteration 2 names its model by path, under each run's own OUT
        return [json.loads(line.replace(str(out), "OUT")) for line in open(out / name)]
    for t in iters:
        assert records(a, f"iter{t}/generated.jsonl") == records(b, f"iter{t}/generated.jsonl")
        assert_same_ranked(world, records(a, f"iter{t}/ranked.jsonl"), records(b, f"iter{t}/ranked.jsonl"))
        start = world / "policy" if t == 1 else b / f"iter{t - 1}" / "checkpoint"
        assert_same_weights(a / f"iter{t}" / "checkpoint", b / f"iter{t}" / "checkpoint", start)


@pytest.mark.slow
def test_run_loop_killed_in_every_stage_then_rerun(world, tmp_path):
    ref = tmp_path / "ref"
    run_loop(loop_env(world, ref))
    out = tmp_path / "loop"
    env = loop_env(world, out)
    it1, it2 = out / "iter1", out / "iter2"
    kill_loop_at(env, "generate/partial-written", tmp_path)  # mid-generate: a batch in OUT.partial
    assert lines(it1 / "generated.jsonl.0.partial") >= 1 and not (it1 / "generated.jsonl").exists()
    kill_loop_at(env, "rank/partial-written", tmp_path)  # mid-rank
    assert lines(it1 / "ranked.jsonl.0.partial") >= 1 and not (it1 / "ranked.jsonl").exists()
    kill_loop_at(env, "checkpoint-weights", tmp_path)  # mid-save of the checkpoint: weights written, not the tokenizer
    assert (it1 / "checkpoint.tmp" / "model.safetensors").exists() and not (it1 / "checkpoint").exists()
    kill_loop_when(env, lambda: (it2 / "generated.jsonl").exists())  # between stages of iteration 2
    # a stage killed inside its output's rename window, via the hook
    p = run_loop(dict(env, SPPO_FAULT="after-rename"), check=False)
    assert p.returncode != 0 and "stage 'rank' failed (iteration 2)" in p.stderr
    p = run_loop(env)
    assert "[iter 1] train: done earlier" in p.stdout and "[iter 2] generate: done earlier" in p.stdout
    assert_same_loop_outputs(world, out, ref)
    assert not [f for f in out.rglob("*") if f.name.endswith((".partial", ".tmp")) or ".jsonl." in f.name]
    assert "nothing to do" in run_loop(env).stdout


# -----------------------------------------------------------------------------
# settings: resuming with other settings than the partial output was made with is refused, naming the setting

def assert_other_settings_refused(world, out, tmp_path):
    """generate: resuming OUT.partial with another model, seed, K or temperature is refused, naming it."""
    partial = f"{out}.partial"
    before = open(partial, "rb").read()
    other_model = tmp_path / "policy-copy"
    shutil.copytree(world / "policy", other_model)
    for extra, named in [(["--model", other_model], f"this run has model='{other_model}'"), (["--seed", 5], "seed=5"),
                         (["--k", 4], "k=4"), (["--temperature", 1.0], "temperature=1.0")]:
        p = gen(world, out, *extra, check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {partial}:1: was made with"), p.stderr
        assert named in err[0]
        assert open(partial, "rb").read() == before


def assert_other_rank_settings_refused(world, reference, out, tmp_path):
    """rank: another ranker, another K, or other responses than those OUT.partial ranked, are refused."""
    before = open(f"{out}.partial", "rb").read()
    other_ranker = tmp_path / "ranker-copy"
    shutil.copytree(world / "ranker", other_ranker)
    p = rank(world, reference / "gen.jsonl", out, "--ranker", other_ranker, check=False)
    assert p.returncode == 2 and f"this run has ranker='{other_ranker}'" in p.stderr
    regenerated = [{**r, "responses": r["responses"][::-1], "generate": {**r["generate"], "seed": 9}}
                   for r in read_jsonl(reference / "gen.jsonl")]
    write_jsonl(tmp_path / "gen-seed9.jsonl", regenerated)
    p = rank(world, tmp_path / "gen-seed9.jsonl", out, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: {tmp_path}/gen-seed9.jsonl:1: record 'p00000' is not the one {out} ranked (generated with "
        "seed=9, not 0); use another --out or delete the old output"]
    write_jsonl(tmp_path / "gen-k2.jsonl", [{**r, "responses": r["responses"][:2]} for r in read_jsonl(reference / "gen.jsonl")])
    p = rank(world, tmp_path / "gen-k2.jsonl", out, check=False)
    assert p.returncode == 2 and "was made with k=3, this run has k=2" in p.stderr
    assert open(f"{out}.partial", "rb").read() == before


# -----------------------------------------------------------------------------
# a prompt longer than the model's context is skipped, with a warning that counts them

def test_too_long_prompts_are_skipped_with_a_count(world, tmp_path):
    prompts = read_jsonl(world / "prompts.jsonl")[:3]
    long = [{"id": f"long{i}", "prompt": "Tell me about cats. " * 400} for i in range(2)]
    write_jsonl(tmp_path / "p.jsonl", prompts[:1] + long + prompts[1:])
    out = tmp_path / "gen.jsonl"
    p = stage("generate", "--model", world / "policy", "--prompts", tmp_path / "p.jsonl", "--out", out, "--engine", "hf",
              "--k", 2, "--max-tokens", 16)
    assert "warning: skipped 2 prompts longer than the model's context (512 tokens)" in p.stderr
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in prompts]


# -----------------------------------------------------------------------------
# the corpus of bad inputs

CASES = json.load(open(os.path.join(BAD, "cases.json")))["cases"]
DEFAULT_OUT = {"generate": "{tmp}/out.jsonl", "rank": "{tmp}/out.jsonl", "train": "{tmp}/ckpt", "evaluate": "{tmp}/eval"}


def tree_digest(*roots):
    h = hashlib.sha256()
    for root in roots:
        for dirpath, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def broken_models(world, tmp_path_factory):
    """Copies of the world's models with files taken away."""
    d = tmp_path_factory.mktemp("broken")
    paths = {}
    for name, src, drop in [("policy_without_tokenizer", "policy", ("tokenizer", "chat_template")),
                            ("ranker_without_tokenizer", "ranker", ("tokenizer", "spm")),
                            ("ranker_without_weights", "ranker", ("model.safetensors",))]:
        shutil.copytree(world / src, d / name, ignore=lambda _, names: [n for n in names if n.startswith(drop)])
        paths[name] = str(d / name)
    return paths


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input(world, broken_models, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    subs = {"world": str(world), "tmp": str(empty), **broken_models}
    subs["input"] = os.path.join(BAD, case["input"])
    fill = lambda s: s.format(**subs)  # noqa: E731
    inp, out = subs["input"], fill(case.get("out", DEFAULT_OUT[case["stage"]]))
    extra = [fill(a) for a in case.get("args", [])]
    # The checks run before any model loads, shown by their order, not by a timing: unless the case is about a
    # model, the model the stage would load does not exist (generate, train: --model; rank, evaluate: --ranker;
    # evaluate checks its --models' paths before anything else), so a stage that reached for it before checking
    # its input would fail with "no such ... directory" instead of the expected error.
    missing = str(tmp_path / "no-such-model")
    if not any(a in ("--model", "--ranker", "--models") for a in extra) and "{world}" not in case.get("out", ""):
        extra += {"generate": ["--model", missing], "train": ["--model", missing]}.get(case["stage"], ["--ranker", missing])
    args = {"generate": ["--model", world / "policy", "--prompts", inp, "--out", out, "--engine", "hf"],
            "rank": ["--in", inp, "--out", out, "--ranker", world / "ranker"],
            "train": ["--model", world / "policy", "--data", inp, "--out", out],
            "evaluate": ["--models", f"base={world}/policy", "other=" + str(world / "policy"), "--prompts", inp,
                         "--ranker", world / "ranker", "--out", out, "--engine", "hf"]}[case["stage"]]
    watched = [BAD, world / "policy", world / "ranker"]
    before = tree_digest(*watched)
    p = stage(case["stage"], *args, *extra, check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr[-2000:]
    assert fill(case["expect"]) in err[0], err[0]
    assert tree_digest(*watched) == before, "an input was changed"
    if out != inp and not out.startswith(str(world)):
        assert not any(os.path.exists(out + s) for s in ("", ".partial", ".tmp")), "an output was written"
    assert os.listdir(empty) == [], "a file was left behind"
    assert not os.path.exists(missing)
