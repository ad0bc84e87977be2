r"""Answers to the paper's other benchmarks, from any checkpoint, in the benchmarks' own answer formats.

    # MT-Bench (FastChat's llm_judge): turn 2 is asked after the model's own answer to turn 1
    python answers.py mt-bench --model runs/mistral7b/iter3/checkpoint \
        --questions FastChat/fastchat/llm_judge/data/mt_bench/question.jsonl \
        --out FastChat/fastchat/llm_judge/data/mt_bench/model_answer/sppo-iter3.jsonl
    # Arena-Hard (arena-hard-auto): one turn per question
    python answers.py arena-hard --model runs/mistral7b/iter3/checkpoint \
        --questions arena-hard-auto/data/arena-hard-v0.1/question.jsonl \
        --out arena-hard-auto/data/arena-hard-v0.1/model_answer/sppo-iter3.jsonl

The model's name in the answers is --out's file name without .jsonl: both tools find a model's answers by that
file name. Decoding is each tool's own default, as the paper used them: MT-Bench samples with FastChat's
temperature per category (0.7 for writing, roleplay and any other; 0.1 for stem, humanities; 0, greedy, for
extraction, math, coding, reasoning) and 1024 new tokens; Arena-Hard is greedy with 4096 new tokens.
--temperature and --max-tokens override them; every other flag is generate.py's (--engine, --dtype,
--kv-cache-gb, --max-model-len, --seed, ...), passed through.

generate.py does the sampling (K = 1, top-p 1), as a subprocess per turn and temperature, through the model's
own chat template: a conversation is a prompt record's `messages`. Its outputs are kept in OUT.work/, so a
killed run resumes and a rerun of the same command generates nothing; the answer file is written last,
atomically. As FastChat does, each answer is stripped of surrounding white space before it enters the next turn.
How to judge the answers (GPT-4 as judge, your API key): docs/evaluation.md.
"""
import argparse
import hashlib
import json
import os
import sys
import time

from common import HelpFormatter, InputError, field, is_hub_id, main_guard, read_jsonl, run_generate, write_text

# FastChat's llm_judge/common.py `temperature_config`; a category it does not list gets 0.7 (gen_model_answer.py).
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULTS = {"mt-bench": {"max_tokens": 1024}, "arena-hard": {"max_tokens": 4096, "temperature": 0.0}}


# -----------------------------------------------------------------------------
# questions in, answers out: each tool's format

def read_mt_bench(path):
    """FastChat's question file: [{"question_id", "category", "turns": [user turns]}] as
    [(question_id, category, turns)]."""
    questions, seen = [], set()
    for n, rec in read_jsonl(path):
        qid = field(path, n, rec, "question_id", (int, str))
        category = field(path, n, rec, "category", str)
        turns = field(path, n, rec, "turns", list)
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError(f"{path}:{n}: field 'turns' should be a non-empty list of non-empty strings")
        if str(qid) in seen:
            raise InputError(f"{path}:{n}: field 'question_id' repeats {qid!r}")
        seen.add(str(qid))
        questions.append((qid, category, turns))
    return questions


def read_arena_hard(path):
    """arena-hard-auto's question file: [{"uid", "prompt", "category", ...}] as [(uid, category, [prompt])]."""
    questions, seen = [], set()
    for n, rec in read_jsonl(path):
        if "uid" not in rec and "question_id" in rec:
            raise InputError(f"{path}:{n}: field 'uid' is missing: this is the older Arena-Hard format "
                             "(question_id, turns); take question.jsonl from the current arena-hard-auto")
        uid = field(path, n, rec, "uid", str)
        prompt = field(path, n, rec, "prompt", str)
        if not prompt.strip():
            raise InputError(f"{path}:{n}: field 'prompt' is empty")
        if uid in seen:
            raise InputError(f"{path}:{n}: field 'uid' repeats {uid!r}")
        seen.add(uid)
        questions.append((uid, rec.get("category", ""), [prompt]))
    return questions


def answer_id(*parts):
    """A stable id for an answer (the tools use a random shortuuid; any unique string is read the same)."""
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:22]


def mt_bench_record(qid, model, answers):
    """One line of FastChat's model-answer file (gen_model_answer.py's `ans_json`)."""
    return {"question_id": qid, "answer_id": answer_id(model, qid, answers), "model_id": model,
            "choices": [{"index": 0, "turns": answers}], "tstamp": time.time()}


def arena_hard_record(uid, model, prompt, answer):
    """One line of arena-hard-auto's model-answer file (gen_answer.py's `ans`); the style metadata (token_len,
    markdown counts) is left to its utils/add_markdown_info.py, which computes it with the tool's own tokenizer."""
    return {"uid": uid, "ans_id": answer_id(model, uid, answer), "model": model,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": {"answer": answer}}],
            "tstamp": time.time()}


def conversation(turns, answers):
    """The messages that ask turn len(answers) + 1: every earlier user turn followed by the model's answer."""
    messages = []
    for user, assistant in zip(turns, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": turns[len(answers)]}]


# -----------------------------------------------------------------------------
# generation: generate.py, one subprocess per (turn, temperature)

def generate(args, name, records, temperature):
    """{id: response} from generate.py with K = 1 on `records` ({"id", "messages"}), written to WORK/NAME.*."""
    prompts, out = os.path.join(args.work, f"{name}.prompts.jsonl"), os.path.join(args.work, f"{name}.jsonl")
    write_jsonl(prompts, records)
    flags = ["--model", args.model, "--k", "1", "--temperature", temperature, "--top-p", "1",
             "--max-tokens", args.max_tokens, *args.generate_args, "--prompts", prompts, "--out", out]
    print(f"answers: {name}: {len(records)} questions at temperature {temperature}", file=sys.stderr, flush=True)
    run_generate(flags, args.verbose, f"on {name}")
    return {r["id"]: r["responses"][0] for _, r in read_jsonl(out)}


def answer_all(args, questions):
    """{question id: [answer to turn 1, turn 2, ...]}: turn j of every question is asked after its answers to the
    turns before it. A question whose turn is not answered (longer than the model's context) stops there."""
    answers = {str(q): [] for q, _, _ in questions}
    temps = {str(q): temperature(args, category) for q, category, _ in questions}
    for j in range(max(len(turns) for _, _, turns in questions)):
        asked = [(str(q), t) for q, _, t in questions if len(t) > j and len(answers[str(q)]) == j]
        for temp in sorted({temps[q] for q, _ in asked}):
            group = [{"id": q, "messages": conversation(t, answers[q])} for q, t in asked if temps[q] == temp]
            got = generate(args, f"turn{j + 1}.t{temp:g}", group, temp)
            for r in group:
                if r["id"] in got:
                    answers[r["id"]].append(got[r["id"]].strip())
    return answers


def temperature(args, category):
    if args.temperature is not None:
        return args.temperature
    return DEFAULTS[args.bench].get("temperature", MT_BENCH_TEMPERATURE.get(category, 0.7))


# -----------------------------------------------------------------------------

def write_jsonl(path, records):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))  # all lines or none


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                 allow_abbrev=False)  # an abbreviation must not take a flag meant for generate.py
    ap.add_argument("bench", choices=["mt-bench", "arena-hard"], help="the benchmark, which decides both formats")
    ap.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ap.add_argument("--questions", required=True, help="the benchmark's question file (JSONL)")
    ap.add_argument("--out", required=True, help="the answer file, MODEL_NAME.jsonl in the tool's model_answer/")
    ap.add_argument("--temperature", type=float, default=None, help="one temperature for every question "
                    "(default: the tool's: FastChat's per category for MT-Bench, 0 for Arena-Hard)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per answer (default: the tool's, "
                    "1024 for MT-Bench, 4096 for Arena-Hard)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--verbose", action="store_true", help="show vLLM's INFO log")
    return ap


def main():
    args, args.generate_args = parser().parse_known_args()  # the rest is generate.py's: --engine, --dtype, ...
    if not args.out.endswith(".jsonl"):
        raise InputError(f"--out {args.out}: should be NAME.jsonl (the tools name a model by its answer file)")
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise InputError(f"--model {args.model}: has no config.json (not a checkpoint)")
    if not os.path.isdir(args.model) and not is_hub_id(args.model):
        raise InputError(f"--model {args.model}: no such checkpoint directory")
    args.max_tokens = args.max_tokens or DEFAULTS[args.bench]["max_tokens"]
    questions = (read_mt_bench if args.bench == "mt-bench" else read_arena_hard)(args.questions)[: args.limit]
    if not questions:
        raise InputError(f"{args.questions}: no questions")
    model = os.path.basename(args.out)[: -len(".jsonl")]
    args.work = args.out + ".work"
    os.makedirs(args.work, exist_ok=True)

    answers = answer_all(args, questions)
    done = [(q, t) for q, _, t in questions if len(answers[str(q)]) == len(t)]
    if len(done) < len(questions):
        print(f"warning: {len(questions) - len(done)} of {len(questions)} questions have no answer to some turn "
              "(longer than the model's context); they are left out of the answer file", file=sys.stderr)
    if args.bench == "mt-bench":
        records = [mt_bench_record(q, model, answers[str(q)]) for q, _ in done]
    else:
        records = [arena_hard_record(q, model, t[0], answers[str(q)][0]) for q, t in done]
    write_jsonl(args.out, records)
    print(f"answers: {len(records)} answers of {model} -> {args.out} (generate.py's outputs: {args.work})",
          file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
