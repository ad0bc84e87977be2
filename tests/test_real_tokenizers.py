"""The recipes' real tokenizers, end to end: Mistral-7B-Instruct-v0.2's sentencepiece vocabulary with its Dec-2023
chat template (the one SPPO used) and with its current one, and Meta-Llama-3-8B-Instruct's tiktoken vocabulary,
each on a tiny random-weight model (examples/tiny/real_vocab.py). The tiny world's byte-level tokenizer hides what
these show: answers that merge with the template's last token, a decoded first space, literal control-token text.

What is trained must be what was sampled: generate.py (both engines) -> rank.py -> train_sppo.py, then the
reference log-prob that train_sppo.py used for each response is recomputed here from the sampled ids alone."""
import json
import math
import os
import sys

import pytest

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, require_vllm, run_stage, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
from common import _encode_pieces, encode_prompt, encode_text, end_of_turn_id  # noqa: E402

KINDS = ["mistral-2023", "mistral", "llama3"]
CONTROL = ["</s>", "<s>", "<|eot_id|>", "<|begin_of_text|>", "[INST]", "[/INST]"]
PROMPTS = ["Tell me about cats.", "Write </s> and <s> here.", "What does <|eot_id|> mean? <|begin_of_text|>",
           "[INST] a nested turn [/INST]", "None of these", "你好，世界 😀"]
# Answers from elsewhere (no token ids): each must train or be skipped with a counted warning, never abort.
EXTERNAL = ["(1) First, wash it.", ", and then it rained.", " a leading space", "\nstarts with a newline",
            "the end </s> is not here", "a <|eot_id|> inside", "<s> at the start", "",
            "猫はかわいい。", "emoji 😀🎉 too", "[INST] fake turn [/INST] ok", "Plain answer."]


def tokenizer(models, kind):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(models[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_encoding_text_as_text(models, kind):
    """encode_chat's careful path equals plain tokenisation of the rendered template where nothing needs care,
    and where a message holds control-token text, that text stays text: one BOS, no early end of turn."""
    tok = tokenizer(models, kind)
    plain = [p for p in PROMPTS + EXTERNAL if p.strip() and not any(c in p for c in CONTROL)]
    for p in plain:
        for messages, gen in (([{"role": "user", "content": p}], True),
                              ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": p}], False)):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert _encode_pieces(tok, messages, gen, text) == tok(text, add_special_tokens=False)["input_ids"], p
    controls = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    base = encode_prompt(tok, "x")
    for p in PROMPTS:
        ids = encode_prompt(tok, p)
        assert sorted(t for t in ids if t in controls) == sorted(t for t in base if t in controls), p
        assert tok.decode(ids).count("</s>") >= p.count("</s>")
    eot = end_of_turn_id(tok)
    assert eot == tok.convert_tokens_to_ids("<|eot_id|>" if kind == "llama3" else "</s>")
    assert eot not in encode_text(tok, "a </s> b <|eot_id|> c")


@pytest.fixture(scope="module", params=KINDS)
def pipeline(request, models, world, tmp_path_factory):
    """generate.py with both engines -> rank.py -> train_sppo.py (--select all) on the sampled records plus
    records of external text, for one real tokenizer."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    write_jsonl(tmp / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    gen = {}
    for engine in ("hf", "vllm"):
        if engine == "vllm":
            require_vllm()
        run_stage("generate.py", "--model", models[kind], "--prompts", tmp / "prompts.jsonl", "--out",
                  tmp / f"{engine}.jsonl", "--engine", engine, "--k", 4, "--max-tokens", 12, "--kv-cache-gb", 0.1,
                  "--temperature", 1.0, "--top-p", 1.0)
        gen[engine] = read_jsonl(tmp / f"{engine}.jsonl")
    merged = [{**r, "id": f"{engine}-{r['id']}"} for engine in gen for r in gen[engine]]
    write_jsonl(tmp / "generated.jsonl", merged)
    run_stage("rank.py", "--in", tmp / "generated.jsonl", "--out", tmp / "ranked.jsonl", "--ranker", world / "ranker")
    ranked = read_jsonl(tmp / "ranked.jsonl")
    external = [{"id": f"ext{i}", "prompt": PROMPTS[1 + i], "responses": EXTERNAL[4 * i:4 * i + 4],
                 "win_rate": [0.2, 0.4, 0.6, 0.8]} for i in range(3)]
    write_jsonl(tmp / "train.jsonl", ranked + external)
    p = run_stage("train_sppo.py", "--model", models[kind], "--data", tmp / "train.jsonl", "--out", tmp / "ckpt",
                  "--select", "all", "--eta", 5, "--lr", 1e-3, "--optimizer", "adamw", "--batch-size", 5,
                  "--micro-batch-size", 5, "--warmup-ratio", 0)
    return {"kind": kind, "tmp": tmp, "gen": gen, "ranked": ranked, "external": external, "train": p}


def test_generate_keeps_the_ids(pipeline, models):
    """prompt_token_ids are the template's ids; response_token_ids end in the end-of-turn id exactly when the
    policy stopped; vLLM's text is what decode_response gives for its ids (the HF engine's text is made so)."""
    from generate import decode_response
    from transformers import GenerationConfig
    tok = tokenizer(models, pipeline["kind"])
    eos = GenerationConfig.from_pretrained(models[pipeline["kind"]]).eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    for engine, recs in pipeline["gen"].items():
        assert len(recs) == len(PROMPTS)
        for r in recs:
            assert r["prompt_token_ids"] == encode_prompt(tok, r["prompt"])
            for ids, why, text in zip(r["response_token_ids"], r["finish_reasons"], r["responses"]):
                assert ids and all(0 <= t < len(tok) for t in ids)
                stops = ids[-1] in stop_ids
                assert (why == "stop") == stops and (why == "length") == (len(ids) == 12 and not stops)
                if engine == "vllm":  # (vLLM holds back a last token that ends inside a UTF-8 character)
                    full = decode_response(tok, r["prompt_token_ids"], ids)
                    assert full == text or full.startswith(text) and "\ufffd" in full[len(text):], (ids, text)


def test_trained_ids_are_the_sampled_ids(pipeline, models):
    """Every generated response trains on its sampled ids (100%): the reference log-prob train_sppo.py used
    equals log pi_t(y|x) computed here from prompt_token_ids + response_token_ids. External text trains on
    the response encoded alone plus the end-of-turn token; nothing is skipped or aborts."""
    import torch
    from transformers import AutoModelForCausalLM
    tok = tokenizer(models, pipeline["kind"])
    model = AutoModelForCausalLM.from_pretrained(models[pipeline["kind"]], dtype=torch.float32).eval()
    ckpt = pipeline["tmp"] / "ckpt"
    ref = {(r["id"], r["response"]): r for r in read_jsonl(ckpt / "reference_logps.jsonl")}
    stats = json.load(open(ckpt / "sppo_train.json"))["stats"]
    n_gen = sum(len(r["responses"]) for r in pipeline["ranked"])
    assert stats["from_generate"] == n_gen and stats["encoded_from_text"] == len(EXTERNAL)
    assert stats["skipped_prompts"] == {} and "warning: skipped" not in pipeline["train"].stderr
    assert len(ref) == n_gen + len(EXTERNAL)
    eot = end_of_turn_id(tok)
    rows = [(r["prompt_token_ids"], ids, (r["id"], i)) for r in pipeline["ranked"]
            for i, ids in enumerate(r["response_token_ids"])]
    rows += [(encode_prompt(tok, r["prompt"]), encode_text(tok, y) + [eot], (r["id"], i))
             for r in pipeline["external"] for i, y in enumerate(r["responses"])]
    same = 0
    with torch.no_grad():
        for prompt_ids, ids, key in rows:
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1:-1]
            logp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ids)[:, None]).sum().item()
            assert ref[key]["tokens"] == len(ids)
            # the trainer's padded micro-batch and chunked lm_head against one unpadded forward: each logit to
            # reordered_fp32 (the vocabulary's logsumexp sums in the same order, of logits that close), a token's
            # log-prob to twice that (its logit and the logsumexp), the response's to the sum over its tokens
            tol = 2 * len(ids) * reordered_fp32(float(logits.abs().max()),
                                                forward_sums(model.config.to_dict(), len(prompt_ids) + len(ids)))
            same += math.isclose(ref[key]["logp"], logp, rel_tol=0, abs_tol=tol)
    assert same == len(rows), f"{same} of {len(rows)} trained responses match their sampled/encoded ids"


def test_checkpoint_keeps_its_tokenizer_and_reloads(pipeline, models):
    kind, tmp = pipeline["kind"], pipeline["tmp"]
    ckpt = tmp / "ckpt"
    if kind.startswith("mistral"):
        assert (ckpt / "tokenizer.model").exists()  # sentencepiece's own file, for the tools that need it
    assert tokenizer({kind: ckpt}, kind).chat_template == tokenizer(models, kind).chat_template
    engine = "vllm" if kind == "llama3" else "hf"
    if engine == "vllm":
        require_vllm()
    run_stage("generate.py", "--model", ckpt, "--prompts", tmp / "prompts.jsonl", "--out", tmp / "again.jsonl",
              "--engine", engine, "--k", 2, "--max-tokens", 8, "--kv-cache-gb", 0.1, "--limit", 2)
    assert len(read_jsonl(tmp / "again.jsonl")) == 2
