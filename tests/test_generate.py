"""generate.py on the tiny policy: both engines, seeds, shards, settings refusal, ids, the chat template.
(Kills and resumes: test_faults.py; bad input: tests/bad_inputs/.)"""
import hashlib
import os

import pytest

from conftest import read_jsonl, require_vllm, run_stage, write_jsonl

GEN = "generate.py"


def gen(world, out, *extra, engine="hf", limit=12, k=3, check=True, kv_cache_gb=0.1):
    memory = ["--kv-cache-gb", kv_cache_gb] if kv_cache_gb else []
    return run_stage(GEN, "--model", world / "policy", "--prompts", world / "prompts.jsonl", "--out", out,
                     "--engine", engine, "--limit", limit, "--k", k, "--max-tokens", 48, *memory, *extra, check=check)


def check_records(recs, n, k):
    assert len(recs) == n
    assert len({r["id"] for r in recs}) == n
    for r in recs:
        assert len(r["responses"]) == k and len(r["finish_reasons"]) == k
        assert all(isinstance(x, str) for x in r["responses"])
        assert sum(len(x) > 0 for x in r["responses"]) >= k - 1  # the trained policy answers
        assert "[INST]" not in "".join(r["responses"]) and "</s>" not in "".join(r["responses"])


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_engine_output_and_determinism(world, tmp_path, engine):
    if engine == "vllm":
        require_vllm()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    p = gen(world, a, engine=engine)
    assert "tokens/s" in p.stderr.splitlines()[-1]
    recs = read_jsonl(a)
    check_records(recs, 12, 3)
    assert recs[0]["generate"]["engine"] == engine and recs[0]["generate"]["k"] == 3
    # the K samples of a prompt differ (temperature 0.7), and prompts do not share a stream
    assert sum(len(set(r["responses"])) > 1 for r in recs) >= 10
    # the same seed gives the same output, and shards concatenate to the whole: a response depends on its prompt
    # and seed only, not on the batch it was drawn in
    parts = []
    for i in range(2):
        gen(world, b, "--shard", f"{i}/2", engine=engine)
        parts += read_jsonl(b)
        os.remove(b)
    assert sorted(parts, key=lambda r: r["id"]) == sorted(recs, key=lambda r: r["id"]), "same seed, same output"
    assert not os.path.exists(str(a) + ".partial")
    gen(world, c := tmp_path / "c.jsonl", "--seed", 1, engine=engine)
    assert [r["responses"] for r in read_jsonl(c)] != [r["responses"] for r in recs], "another seed, other samples"


def test_vllm_without_memory_flags_sizes_its_cache_from_the_job(world, tmp_path):
    """On a CPU, no --kv-cache-gb: the cache is sized for K x prompts x (longest prompt + --max-tokens), not 90%
    of the machine, and the samples are those of a run with an explicit size (the context given to vLLM does
    not change what it samples)."""
    require_vllm()
    import torch
    if torch.cuda.is_available():
        pytest.skip("the job-sized KV cache is the CPU default; a GPU run uses --gpu-memory-utilization")
    p = gen(world, tmp_path / "auto.jsonl", engine="vllm", limit=4, k=2, kv_cache_gb=None)
    line = next(x for x in p.stderr.splitlines() if x.startswith("generate: vLLM KV cache"))
    assert "x 8 sequences" in line and "--kv-cache-gb" in line  # K=2 x 4 prompts
    gen(world, tmp_path / "fixed.jsonl", engine="vllm", limit=4, k=2)
    assert read_jsonl(tmp_path / "auto.jsonl") == read_jsonl(tmp_path / "fixed.jsonl")


@pytest.mark.parametrize("flag", [("--kv-cache-gb", 0.000001),
                                  pytest.param(("--max-model-len", 100000), marks=pytest.mark.slow)])
def test_vllm_start_failure_is_one_line(world, tmp_path, flag):
    """A cache too small for one sequence, a context longer than the model's: one error line naming the flags
    to change, exit 2, no traceback, no output."""
    require_vllm()
    out = tmp_path / "o.jsonl"
    p = gen(world, out, *flag, engine="vllm", limit=2, k=1, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vLLM could not start")
    assert all(f in last for f in ("--kv-cache-gb", "--gpu-memory-utilization", "--max-model-len"))
    assert "Traceback" not in p.stderr
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_vllm_cpu_prompts_over_the_step_budget(world, tmp_path):
    """Prompts whose tokens together exceed vLLM's per-step budget on a CPU (max_num_batched_tokens, 4096 there):
    a chunked prefill would split one of them across steps and rewind its seeded generator, which a CPU generator
    cannot do ("CPU Generator does not use offset"). generate.py runs them, and each prompt's samples equal those
    of calls of one prompt at a time (--write-every 1: ~420 tokens, under the budget), so whole prefills change
    nothing the policy samples. (The K samples of one prompt share its prefill through vLLM's prefix cache: it is
    the distinct prompts' tokens that must exceed the budget.)"""
    require_vllm()
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA generators rewind; the CPU engine is the one that cannot")
    texts = [r["prompt"] for r in read_jsonl(world / "prompts.jsonl")]
    # ~420 tokens each in the tiny tokenizer (its context is 512); 12 prompts = ~5,000 prompt tokens
    write_jsonl(tmp_path / "long.jsonl", [{"id": f"long{i}", "prompt": " ".join((texts[i:] + texts)[:64])}
                                          for i in range(12)])

    def run(name, *extra):
        run_stage(GEN, "--model", world / "policy", "--prompts", tmp_path / "long.jsonl", "--out", tmp_path / name,
                  "--engine", "vllm", "--k", 2, "--max-tokens", 8, "--kv-cache-gb", 0.1, *extra)
        return read_jsonl(tmp_path / name)
    whole = run("whole.jsonl")
    lengths = [len(r["prompt_token_ids"]) for r in whole]
    assert sum(lengths) > 4096 and max(lengths) < 512 - 8, lengths  # the step budget is exceeded: a split
    assert run("one.jsonl", "--write-every", 1) == whole


def test_release_seed_mode(world, tmp_path):
    gen(world, tmp_path / "r.jsonl", "--seed-mode", "release")
    recs = read_jsonl(tmp_path / "r.jsonl")
    check_records(recs, 12, 3)
    assert recs[0]["generate"]["seed_mode"] == "release"


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])  # vLLM: 2 shards above
def test_shards_concatenate_to_the_whole(world, tmp_path, engine):
    if engine == "vllm":
        require_vllm()
    gen(world, tmp_path / "whole.jsonl", engine=engine, limit=10)
    parts = []
    for i in range(3):
        gen(world, tmp_path / f"s{i}.jsonl", "--shard", f"{i}/3", engine=engine, limit=10)
        parts += read_jsonl(tmp_path / f"s{i}.jsonl")
    whole = read_jsonl(tmp_path / "whole.jsonl")
    assert sorted(r["id"] for r in parts) == sorted(r["id"] for r in whole)
    # a response depends on its prompt and seed only, not on the batch it was drawn in
    assert sorted(parts, key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])


def test_skip_takes_the_next_prompts_with_the_same_answers(world, tmp_path):
    """--skip 2 --limit 3 answers prompts 3-5 of the file, each as a run from the start answers it (its seed
    depends on its id, not its position); skipping every prompt is one error line and no output."""
    ids = [r["id"] for r in read_jsonl(world / "prompts.jsonl")]
    gen(world, tmp_path / "whole.jsonl", limit=5, k=2)
    gen(world, tmp_path / "part.jsonl", "--skip", 2, limit=3, k=2)
    part = read_jsonl(tmp_path / "part.jsonl")
    assert [r["id"] for r in part] == ids[2:5]
    assert part == read_jsonl(tmp_path / "whole.jsonl")[2:5]
    out = tmp_path / "none.jsonl"
    p = gen(world, out, "--skip", len(ids), limit=3, k=2, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        f"error: {world / 'prompts.jsonl'}: {len(ids)} prompts, none left after --skip {len(ids)}"
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_resume_refuses_other_settings(world, tmp_path):
    out = tmp_path / "o.jsonl"
    gen(world, out, limit=4)
    p = gen(world, out, "--seed", 7, limit=6, check=False)
    assert p.returncode == 2
    assert "seed=0" in p.stderr and "seed=7" in p.stderr


def test_prompts_without_ids_get_stable_ids(world, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Tell me about cats."}, {"prompt": "Describe rivers."}])
    run_stage(GEN, "--model", world / "policy", "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl",
              "--engine", "hf", "--k", 2, "--max-tokens", 16)
    ids = [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")]
    # the README's rule, restated: the first 16 hex digits of the prompt's SHA-1
    assert ids == [hashlib.sha1(t.encode("utf-8")).hexdigest()[:16] for t in ("Tell me about cats.", "Describe rivers.")]


def test_seeds_of_both_modes_through_generate(world, tmp_path):
    """Two prompts with the same text and different ids: release mode gives them the same answers (one seed per
    sample index, for every prompt), prompt mode different ones (a stream per id). Release mode's sample p of
    --seed 3 is drawn with seed 3 + 50 p: sample 1 is sample 0 of a run with --seed 53."""
    text = read_jsonl(world / "prompts.jsonl")[0]["prompt"]
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": text}, {"id": "b", "prompt": text}])

    def answers(name, *extra):
        run_stage(GEN, "--model", world / "policy", "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / name,
                  "--engine", "hf", "--max-tokens", 24, *extra)
        return [r["responses"] for r in read_jsonl(tmp_path / name)]
    a, b = answers("release.jsonl", "--seed-mode", "release", "--seed", 3, "--k", 3)
    assert a == b and len(set(a)) == 3
    assert answers("release53.jsonl", "--seed-mode", "release", "--seed", 53, "--k", 1)[0] == a[1:2]
    a, b = answers("prompt.jsonl", "--seed", 3, "--k", 3)
    assert a != b


def test_chat_template_single_bos(world):
    from transformers import AutoTokenizer
    from generate import encode_prompt
    tok = AutoTokenizer.from_pretrained(world / "policy")
    ids = encode_prompt(tok, "Tell me about None of these.")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.pad_token_id != tok.eos_token_id
    assert "None of these" in tok.decode(ids)
