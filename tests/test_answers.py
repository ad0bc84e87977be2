"""Conversations as prompts (generate.py's `messages`) and answers.py's files for MT-Bench and Arena-Hard.

MT-Bench's answers are read by FastChat's own code (the fschat package, installed beside ours from
requirements/eval.txt): its loaders, its data check and its single-answer judge up to the API call. Arena-Hard is
not a package: its loader and the fields its judge and its style script read are restated below from
arena-hard-auto's code (utils/completion.py, gen_judgment.py, utils/add_markdown_info.py)."""
import glob
import json
import os

import pytest

from conftest import read_jsonl, require_vllm, run_stage, write_jsonl

from common import InputError, load_prompts  # noqa: E402

TWO_TURNS = [  # FastChat's question format; a writing question samples (0.7), a math one is greedy (0)
    {"question_id": 81, "category": "writing", "turns": ["Tell me about cats.", "Now say it about dogs."]},
    {"question_id": 82, "category": "math", "turns": ["Describe rivers.", "Describe them again, shorter."]},
]


def tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def chat_ids(tok, messages):
    """The ids transformers itself gives a conversation and the assistant header (no project code)."""
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


# -----------------------------------------------------------------------------
# conversations as prompts

@pytest.mark.parametrize("kind", ["mistral-2023", "mistral", "llama3"])
def test_a_conversation_renders_as_the_chat_template_does(models, kind):
    """With the recipes' real vocabularies and templates: a two-turn conversation with a system turn where the
    template takes one, and an earlier answer that holds control-token text, which stays text."""
    from generate import encode_record
    tok = tokenizer(models[kind])
    messages = [{"role": "user", "content": "Tell me about cats."}, {"role": "assistant", "content": "Cats purr."},
                {"role": "user", "content": "And dogs?"}]
    if kind != "mistral-2023":  # its Dec-2023 template refuses a system turn (below)
        messages = [{"role": "system", "content": "Be brief."}] + messages
    ids = encode_record(tok, {"id": "q", "messages": messages}, "q.jsonl")
    assert ids == chat_ids(tok, messages)
    eos = {"llama3": "<|eot_id|>"}.get(kind, "</s>")
    typed = [dict(m, content=m["content"] + f" {eos} <s>") if m["role"] == "assistant" else m for m in messages]
    eos_id = tok.convert_tokens_to_ids(eos)
    assert encode_record(tok, {"id": "q", "messages": typed}, "q.jsonl").count(eos_id) == ids.count(eos_id)


def test_a_template_that_refuses_a_conversation_is_one_line(models):
    from generate import encode_record
    tok = tokenizer(models["mistral-2023"])
    bad = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(InputError, match="q.jsonl: id 'x': field 'messages': the chat template refuses it "
                                         r"\(TemplateError: Conversation roles must alternate"):
        encode_record(tok, {"id": "x", "messages": bad}, "q.jsonl")


@pytest.mark.parametrize("record, error", [
    ({"messages": []}, "p.jsonl:1: field 'messages' should be a non-empty list"),
    ({"messages": "hi"}, "p.jsonl:1: field 'messages' should be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"p.jsonl:1: field 'messages\[0\]' should be"),
    ({"messages": [{"role": "user"}]}, r"p.jsonl:1: field 'messages\[0\]' should be"),
    ({"messages": [{"role": "user", "content": " "}]}, r"p.jsonl:1: field 'messages\[0\].content' is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "p.jsonl:1: field 'messages' ends with a 'assistant' turn"),
    ({"id": "x"}, "p.jsonl:1: field 'prompt' is missing"),
])
def test_bad_conversations_name_file_line_and_field(tmp_path, record, error):
    write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(InputError, match=error):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_prompt_and_messages_records_through_generate(world, tmp_path):
    """A one-turn `messages` record is given exactly a `prompt` record's ids and comes back with its messages; an
    earlier answer may be empty; a rerun resumes, and a changed conversation under a finished id is refused."""
    text = read_jsonl(world / "prompts.jsonl")[0]["prompt"]
    one = [{"role": "user", "content": text}]
    two = [*one, {"role": "assistant", "content": ""}, {"role": "user", "content": "More."}]
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": text}, {"id": "b", "messages": one},
                                       {"id": "c", "messages": two}])
    args = ["--model", world / "policy", "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl",
            "--engine", "hf", "--k", 2, "--max-tokens", 8]
    run_stage("generate.py", *args)
    a, b, c = read_jsonl(tmp_path / "o.jsonl")
    assert a["prompt_token_ids"] == b["prompt_token_ids"] == chat_ids(tokenizer(world / "policy"), one)
    assert (a.get("messages"), b.get("prompt"), b["messages"], c["messages"]) == (None, None, one, two)
    assert c["prompt_token_ids"] == chat_ids(tokenizer(world / "policy"), two)
    assert "3 already done, 0 to do" in run_stage("generate.py", *args).stderr
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": text}, {"id": "b", "messages": two}])
    p = run_stage("generate.py", *args, check=False)
    assert p.returncode == 2 and "the prompt of id 'b' is not the one" in p.stderr.strip().splitlines()[-1]


def test_evaluate_refuses_conversations(world, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "messages": [
        {"role": "user", "content": "y"}]}])
    p = run_stage("evaluate.py", "--models", f"base={world / 'policy'}", "--prompts", tmp_path / "p.jsonl",
                  "--ranker", world / "ranker", "--out", tmp_path / "eval", check=False)
    assert p.returncode == 2 and "id 'b' is a conversation" in p.stderr


# -----------------------------------------------------------------------------
# MT-Bench: FastChat's own code reads the answers

# vLLM (what a GPU runs) with one temperature for both questions: two engine starts instead of four on the CPU.
@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_mt_bench_answers_are_read_and_judged_by_fastchat(world, tmp_path, monkeypatch, engine):
    from fastchat.llm_judge import common as fc
    write_jsonl(tmp_path / "question.jsonl", TWO_TURNS)
    out = tmp_path / "model_answer" / "tiny-sppo.jsonl"
    if engine == "vllm":
        require_vllm()
    one = ["--temperature", 0, "--kv-cache-gb", 0.1] if engine == "vllm" else []
    run_stage("answers.py", "mt-bench", "--model", world / "policy", "--questions", tmp_path / "question.jsonl",
              "--out", out, "--engine", engine, "--max-tokens", 12, *one)

    questions = fc.load_questions(str(tmp_path / "question.jsonl"), None, None)
    answers = fc.load_model_answers(str(tmp_path / "model_answer"))
    fc.check_data(questions, answers, {}, ["tiny-sppo"], {})  # FastChat's gen_judgment check: every question
    assert sorted(answers["tiny-sppo"]) == [81, 82]           # keyed by its question_id, as in the question file
    for q in questions:
        a = answers["tiny-sppo"][q["question_id"]]
        assert a["model_id"] == "tiny-sppo" and len(a["choices"][0]["turns"]) == 2

    # Turn 2 was asked after the model's own turn-1 answer: the ids given to the engine are the conversation's.
    tok = tokenizer(world / "policy")
    work = str(out) + ".work"
    for q in questions:
        t = 0.0 if one else fc.temperature_config[q["category"]]  # FastChat's temperature for the category
        first, second = answers["tiny-sppo"][q["question_id"]]["choices"][0]["turns"]
        rec, = [r for r in read_jsonl(f"{work}/turn2.t{t:g}.jsonl") if r["id"] == str(q["question_id"])]
        conv = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": first},
                {"role": "user", "content": q["turns"][1]}]
        assert rec["prompt_token_ids"] == chat_ids(tok, conv) and first in tok.decode(rec["prompt_token_ids"])
        assert rec["responses"][0].strip() == second and rec["generate"]["temperature"] == t

    # FastChat's single-answer judge on the multi-turn prompt, up to the API call (which answers a rating here)
    seen = []
    monkeypatch.setattr(fc, "chat_completion_openai",
                        lambda model, conv, temperature, max_tokens: seen.append(conv.messages) or "Rating: [[7]]")
    judge = fc.Judge("gpt-4", {"system_prompt": "Judge.", "output_format": "[[rating]]", "prompt_template":
                     "Q1 {question_1}\nA1 {answer_1}\nQ2 {question_2}\nA2 {answer_2}"}, multi_turn=True)
    q = questions[0]
    rating, prompt, _ = fc.run_judge_single(q, answers["tiny-sppo"][81], judge, None, multi_turn=True)
    a1, a2 = answers["tiny-sppo"][81]["choices"][0]["turns"]
    assert rating == 7 and prompt == f"Q1 {q['turns'][0]}\nA1 {a1}\nQ2 {q['turns'][1]}\nA2 {a2}"
    assert seen and prompt in seen[0][0][1]


def test_turns_are_asked_in_order_stripped_and_grouped_by_temperature(monkeypatch):
    """answers.answer_all with generate.py replaced by a recorder: turn 2 carries turn 1's answer stripped, as
    FastChat's gen_model_answer.py strips it; each call holds one of FastChat's temperatures; a question whose
    turn 1 got no answer is not asked turn 2."""
    import answers
    from fastchat.llm_judge.common import temperature_config
    calls = []

    def fake_generate(args, name, records, temperature):
        calls.append((name, temperature, [r["messages"] for r in records], [r["id"] for r in records]))
        # question 82's first turn is left unanswered, as generate.py leaves a prompt longer than the context
        return {r["id"]: f"  answer {len(r['messages'])} to {r['id']}\n" for r in records if r["id"] != "82"}
    monkeypatch.setattr(answers, "generate", fake_generate)
    args = answers.parser().parse_args(["mt-bench", "--model", "m", "--questions", "q", "--out", "o.jsonl"])
    questions = [(q["question_id"], q["category"], q["turns"]) for q in TWO_TURNS] + [(83, "other", ["Once."])]
    got = answers.answer_all(args, questions)
    assert got == {"81": ["answer 1 to 81", "answer 3 to 81"], "82": [], "83": ["answer 1 to 83"]}
    groups = {name: (t, ids) for name, t, _, ids in calls}
    assert groups == {"turn1.t0": (0.0, ["82"]), "turn1.t0.7": (0.7, ["81", "83"]), "turn2.t0.7": (0.7, ["81"])}
    assert temperature_config["writing"] == 0.7 and temperature_config["math"] == 0.0  # 83: FastChat's default 0.7
    turn2 = {m[0]["content"]: m for _, _, ms, _ in calls for m in ms if len(m) == 3}
    assert turn2["Tell me about cats."][1] == {"role": "assistant", "content": "answer 1 to 81"}
    assert turn2["Tell me about cats."][2] == {"role": "user", "content": "Now say it about dogs."}


def test_bad_question_files_are_one_line(world, tmp_path):
    cases = {"mt-bench": [({"question_id": 1, "category": "math", "turns": []}, "field 'turns' should be"),
                          ({"question_id": 1, "turns": ["x"]}, "field 'category' is missing")],
             "arena-hard": [({"question_id": 1, "turns": [{"content": "x"}]},
                             "field 'uid' is missing: this is the older Arena-Hard format"),
                            ({"uid": "u", "prompt": ""}, "field 'prompt' is empty")]}
    for bench, bad in cases.items():
        for rec, error in bad:
            write_jsonl(tmp_path / "q.jsonl", [rec])
            p = run_stage("answers.py", bench, "--model", world / "policy", "--questions", tmp_path / "q.jsonl",
                          "--out", tmp_path / "a" / "m.jsonl", check=False)
            assert p.returncode == 2 and f"q.jsonl:1: {error}" in p.stderr.strip().splitlines()[-1], p.stderr
            assert not os.path.exists(tmp_path / "a" / "m.jsonl")
    write_jsonl(tmp_path / "q.jsonl", TWO_TURNS)
    for model, error in ((tmp_path / "nope", "no such checkpoint directory"), (tmp_path, "has no config.json (not a checkpoint)")):
        p = run_stage("answers.py", "mt-bench", "--model", model, "--questions", tmp_path / "q.jsonl", "--out",
                      tmp_path / "a" / "m.jsonl", check=False)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"error: --model {model}: {error}"]
        assert not os.path.exists(tmp_path / "a")  # nothing written, not even the work directory


# -----------------------------------------------------------------------------
# Arena-Hard: its loader's reads, restated from arena-hard-auto's code

def arena_hard_load_model_answers(answer_dir):
    """arena-hard-auto utils/completion.py load_model_answers: every *.jsonl in the directory, the model named
    by the file name, each line keyed by its uid."""
    model_answers = {}
    for filename in sorted(glob.glob(os.path.join(answer_dir, "*.jsonl"))):
        with open(filename) as fin:
            model_answers[os.path.basename(filename)[:-6]] = {
                line["uid"]: line for line in map(json.loads, fin)}
    return model_answers


def test_arena_hard_answers_match_its_loader(world, tmp_path):
    import pandas as pd
    questions = [{"uid": "328c149e", "category": "arena-hard-v0.1", "cluster": "c", "prompt": "Tell me about cats."},
                 {"uid": "b43c0765", "category": "arena-hard-v0.1", "cluster": "c", "prompt": "Describe rivers."}]
    write_jsonl(tmp_path / "question.jsonl", questions)
    out = tmp_path / "model_answer" / "tiny-sppo.jsonl"
    args = ["arena-hard", "--model", world / "policy", "--questions", tmp_path / "question.jsonl", "--out", out,
            "--engine", "hf", "--max-tokens", 12]
    run_stage("answers.py", *args)
    answers = arena_hard_load_model_answers(tmp_path / "model_answer")["tiny-sppo"]
    gen = {r["id"]: r for r in read_jsonl(str(out) + ".work/turn1.t0.jsonl")}
    for q in questions:
        a = answers[q["uid"]]
        # gen_judgment.py's reads: the model's name and the last message's answer, after the question
        assert a["model"] == "tiny-sppo" and a["messages"][0] == {"role": "user", "content": q["prompt"]}
        assert a["messages"][-1]["role"] == "assistant"
        assert a["messages"][-1]["content"]["answer"] == gen[q["uid"]]["responses"][0].strip()
        assert gen[q["uid"]]["generate"]["temperature"] == 0.0  # its gen_answer's default: greedy
        assert gen[q["uid"]]["generate"]["max_tokens"] == 12
    # utils/add_markdown_info.py reads the file with pandas and takes each last message's answer
    df = pd.read_json(out, lines=True)
    assert list(df["uid"]) == [q["uid"] for q in questions]
    assert [m[-1]["content"]["answer"] for m in df["messages"]] == [answers[q["uid"]]["messages"][-1]["content"][
        "answer"] for q in questions]
    # a rerun of the same command generates nothing, and gives the same answers
    before = read_jsonl(out)
    assert "0 to do" in run_stage("answers.py", *args).stderr
    assert [r["messages"] for r in read_jsonl(out)] == [r["messages"] for r in before]
