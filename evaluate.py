r"""Evaluate SPPO iterations: each model's responses judged against a baseline by PairRM (or a reward model, an LLM
judge or a Python function: --ranker, --ranker-kind; docs/preference-models.md), AlpacaEval-style.

    python evaluate.py --models base=runs/tiny/world/policy iter1=runs/tiny/iter1/checkpoint \
        iter2=runs/tiny/iter2/checkpoint --prompts runs/tiny/world/eval_prompts.jsonl \
        --ranker runs/tiny/world/ranker --baseline base --out runs/tiny/eval
    # AlpacaEval 2.0's 805 instructions against its GPT-4 Turbo reference outputs (the prompts are the
    # reference's instructions when --prompts is left out):
    python evaluate.py --models base=mistralai/Mistral-7B-Instruct-v0.2 iter3=runs/mistral7b/iter3/checkpoint \
        --reference-outputs gpt4_turbo_outputs.json --out runs/mistral7b/eval

1. One response per prompt per model, greedy by default: generate.py with --k 1 as a subprocess, writing
   OUT/outputs/NAME.jsonl; finished outputs are reused, so a rerun generates nothing. Every flag evaluate.py
   does not know goes to generate.py (--max-tokens, --engine, --kv-cache-gb, --temperature, --seed, ...).
   vLLM's INFO log is kept quiet unless --verbose.
2. Each model against the baseline (one of --models, or --reference-outputs), both orders through PairRM:
   outcome o = (sigmoid(M(model, base)) + 1 - sigmoid(M(base, model))) / 2, a soft win in [0, 1] (a reward model's
   M(a, b) = r_a - r_b gives o = sigmoid(r_model - r_base), a function's score likewise; a judge's
   M = log p(A) - log p(B)). Identical
   responses are a tie (o = 1/2) without asking the ranker. Judgments are cached in OUT/judgments/.
3. Win rate = mean(o) (a tie counts 1/2) with its standard error; length-controlled win rate = sigmoid(b0) of
   the logistic fit o ~ sigmoid(b0 + b1 tanh(d / sd(d))), d = len(model) - len(base) in characters: the win
   rate the model would have at equal length (AlpacaEval 2.0's GLM without its per-instruction terms).

Writes OUT/results.json, OUT/results.md (also printed), OUT/winrate.png, and OUT/alpaca_eval/NAME/model_outputs.json
([{"instruction", "output", "generator"}]) for each model, to score with AlpacaEval's own judge (docs/reproducing.md):
    alpaca_eval --model_outputs OUT/alpaca_eval/iter3/model_outputs.json --reference_outputs REFERENCE.json \
        --annotators_config weighted_alpaca_eval_gpt4_turbo
with a warning when they are not AlpacaEval's 805 instructions in its order (its LC would then misalign).
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np

from common import (HelpFormatter, InputError, ResumableWriter, is_hub_id, load_prompts, main_guard, open_reporter,
                    progress, prompt_id, read_jsonl, run_generate, write_atomic, write_text)
from pairrm import DTYPES, sigmoid  # numpy only: importing pairrm or preference loads no model code
from preference import JUDGE_TEMPLATE, KINDS, check_preference_path, detect_kind, read_judge_template
from preference import settings as kind_settings


# -----------------------------------------------------------------------------
# the math

def outcome(m_ab, m_ba):
    """Soft win of a over b from both orders of PairRM: (sigmoid(M_ab) + 1 - sigmoid(M_ba)) / 2, so that
    PairRM's position bias cancels and swapping a and b gives 1 - o. (Written as 1/2 + difference / 2 so
    that equal logits give exactly 1/2 in floating point.)"""
    return 0.5 + (sigmoid(m_ab) - sigmoid(m_ba)) / 2.0


def win_rate(outcomes):
    """(win rate, standard error): mean(o) and std(o, ddof=1) / sqrt(n); a tie (o = 1/2) counts half."""
    o = np.asarray(outcomes, dtype=np.float64)
    return float(o.mean()), float(o.std(ddof=1) / np.sqrt(len(o)))


def length_controlled_win_rate(outcomes, len_model, len_base, l2=0.1):
    """(LC win rate, standard error): the win rate at zero length difference.

    Logistic model P(model wins) = sigmoid(b0 + b1 z), z = tanh(d / sd(d)), d = len_model - len_base, fitted to
    the soft outcomes o by Newton's method on the cross-entropy sum_i -[o_i log p_i + (1 - o_i) log(1 - p_i)]
    + l2/2 b1^2 (the L2 term keeps b1 finite when length separates wins from losses). LC = sigmoid(b0).
    This is AlpacaEval 2.0's length-controlled GLM for one model against one baseline, without its
    instruction-difficulty term. The standard error is the delta method on b0's sandwich variance, which
    stays honest for soft outcomes. When every d is equal, length cannot be told apart from quality: z = 0.
    """
    o = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(len_model, dtype=np.float64) - np.asarray(len_base, dtype=np.float64)
    sd = d.std(ddof=1)
    z = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(z), z], axis=1)
    reg = np.array([1e-6, l2])  # the tiny b0 term only keeps b0 finite when every outcome is a win (or a loss)

    def loss(b):
        t = X @ b  # -[o log p + (1-o) log(1-p)] = log(1 + e^t) - o t, written to not overflow
        return float(np.sum(np.logaddexp(0.0, t) - o * t) + 0.5 * np.sum(reg * b * b))

    b = np.zeros(2)
    for _ in range(100):
        p = sigmoid(X @ b)
        grad = X.T @ (p - o) + reg * b
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, loss(b)
        while loss(b - t * step) > f0 and t > 1e-6:  # the objective is convex; halving only guards overshoot
            t /= 2
        b = b - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    p = sigmoid(X @ b)
    hess_inv = np.linalg.inv((X * (p * (1 - p))[:, None]).T @ X + np.diag(reg))
    g = X * (p - o)[:, None]
    var_b0 = (hess_inv @ (g.T @ g) @ hess_inv)[0, 0]
    lc = float(sigmoid(b[0]))
    return lc, float(lc * (1 - lc) * np.sqrt(var_b0))


# -----------------------------------------------------------------------------
# inputs

def parse_models(specs):
    """[(name, path)] from NAME=PATH (or PATH alone: NAME is its last component); names become file names."""
    models = []
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (os.path.basename(spec.rstrip("/")), spec)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
            raise InputError(f"--models {spec}: the name '{name}' should be letters, digits, '.', '_' or '-'")
        if any(name == n for n, _ in models):
            raise InputError(f"--models: the name '{name}' is given twice")
        check_model(spec, path)
        models.append((name, path))
    return models


def check_model(spec, path):
    """A checkpoint directory, or something only a hub id can be: fail before any work, not at model 3."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"--models {spec}: {path} has no config.json (not a checkpoint)")
        return
    if not is_hub_id(path):
        raise InputError(f"--models {spec}: no such checkpoint directory")


def load_reference(path):
    """{instruction: output} from an AlpacaEval-style JSON list of {"instruction", "output", ...}, and its
    generator name (or None)."""
    if not os.path.isfile(path):
        raise InputError(f"--reference-outputs {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--reference-outputs {path}: not valid JSON ({e})")
    if not isinstance(data, list) or not data:
        raise InputError(f"--reference-outputs {path}: expected a non-empty JSON list of {{instruction, output}}")
    ref = {}
    for i, rec in enumerate(data):
        if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("instruction", "output"))):
            raise InputError(f"--reference-outputs {path}: item {i} needs string fields 'instruction' and 'output'")
        if ref.setdefault(rec["instruction"], rec["output"]) != rec["output"]:
            raise InputError(f"--reference-outputs {path}: item {i} repeats an instruction with another output")
    return ref, data[0].get("generator")


def read_outputs(path):
    """{id: (prompt, response)} from generate.py's output with K = 1."""
    return {str(r["id"]): (r["prompt"], r["responses"][0]) for _, r in read_jsonl(path)}


# -----------------------------------------------------------------------------
# step 1: responses

def generate(name, model, args, prompt_ids):
    """OUT/outputs/NAME.jsonl from generate.py, unless a finished one made by the same command exists.

    generate.py gets --k 1, greedy decoding, and every flag evaluate.py does not know itself (--max-tokens,
    --engine, --kv-cache-gb, --temperature, ...), which it checks. OUT/outputs/NAME.args.json keeps the
    command of a finished run, so a rerun with the same flags starts no generate.py at all."""
    out = os.path.join(args.out, "outputs", f"{name}.jsonl")
    # what decides the responses (the prompts are checked by id: the same ones may come from another file)
    flags = ["--model", model, "--k", "1", "--temperature", "0", "--top-p", "1", *args.generate_args]
    done = os.path.join(args.out, "outputs", f"{name}.args.json")
    if os.path.exists(out) and os.path.exists(done) and not os.path.exists(out + ".partial"):
        with open(done) as f:
            if json.load(f) == flags and prompt_ids <= {str(r["id"]) for _, r in read_jsonl(out)}:
                print(f"evaluate: {name}: responses done ({out})", file=sys.stderr, flush=True)
                return out
    # Not done (or made otherwise: generate.py resumes, or refuses other settings naming the one that differs).
    print(f"evaluate: {name}: generating with {model}", file=sys.stderr, flush=True)
    limit = ["--limit", str(args.limit)] if args.limit is not None else []
    run_generate([*flags, "--prompts", args.prompts_file, "--out", out, *limit], args.verbose, f"for model '{name}'")
    write_json(done, flags)
    return out


# -----------------------------------------------------------------------------
# step 2: judgments

def text_hash(text):
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def judge(name, base_name, rows, args, ranker):
    """Soft outcomes of `name` against the baseline for rows [(id, prompt, response, base_response)].

    Cached in OUT/judgments/NAME_vs_BASE.jsonl, one record per (id, response, base response): a changed
    response is judged again, an unchanged one never. `ranker` is a function that loads the preference model once."""
    path = os.path.join(args.out, "judgments", f"{name}_vs_{base_name}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = ResumableWriter(path, {"ranker": args.ranker, **kind_settings(args.ranker_kind, args.judge_template_text)},
                             "judge")
    keys = [f"{rid}:{text_hash(a)}:{text_hash(b)}" for rid, _, a, b in rows]
    todo = [(k, row) for k, row in zip(keys, rows) if k not in writer.done]
    print(f"judge: {name} vs {base_name}: {len(rows)} prompts, {len(rows) - len(todo)} cached, {len(todo)} to do",
          file=sys.stderr, flush=True)
    new = [{"id": k, "logits": None, "outcome": 0.5} for k, (_, _, a, b) in todo if a == b]  # a tie, exactly
    if new:
        writer.write(new)
    todo = [(k, row) for k, row in todo if row[2] != row[3]]
    if todo:
        preference = ranker()
        bar = progress(total=2 * len(todo), desc=f"judge {name}", unit="pair")
        for start in range(0, len(todo), args.write_every):
            part = todo[start:start + args.write_every]
            pairs = [(x, a, b) for _, (_, x, a, b) in part] + [(x, b, a) for _, (_, x, a, b) in part]
            rids = [rid for _, (rid, _, _, _) in part]
            m = preference.pair_logits(pairs, progress_bar=bar, ids=rids + rids)
            m_ab, m_ba = m[:len(part)], m[len(part):]
            writer.write([{"id": k, "logits": [float(x), float(y)], "outcome": float(outcome(x, y))}
                          for (k, _), x, y in zip(part, m_ab, m_ba)])
        bar.close()
    writer.close(keys)
    return np.array([writer.done[k]["outcome"] for k in keys])


# -----------------------------------------------------------------------------
# outputs

def write_json(path, obj):
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False) + "\n")


def alpaca_eval_misaligned(reference, instructions):
    """Whether AlpacaEval's own length-controlled win rate could misread the exported outputs. Its GLM looks up
    each row's instruction difficulty by row position, which is right only for AlpacaEval's 805 instructions,
    all of them, in its order: known here only when the reference has 805 outputs and the exported
    instructions are exactly its instructions, in its order."""
    return not (reference is not None and len(reference) == 805 and list(reference) == list(instructions))


def markdown_table(results, base_name, ranker, kind="pairrm"):
    label = {"reward": "reward model", "judge": "LLM judge", "function": "preference function"}
    judged = f"`{ranker}`" + (f" ({label[kind]})" if kind in label else "")
    lines = [f"Win rates against **{base_name}**, judged by {judged} (both orders; a tie counts 1/2). "
             "LC: length-controlled.", "",
             "| model | LC win rate (%) | win rate (%) | mean length (chars) | n |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['lc_win_rate']:.2f} ± {100 * r['lc_se']:.2f} | "
                     f"{100 * r['win_rate']:.2f} ± {100 * r['se']:.2f} | {r['mean_length']:.0f} | {r['n']} |")
    return "\n".join(lines) + "\n"


def report_win_rates(results, args):
    """The win rates on the run's dashboard (--report-to): one step per model, in --models order (base, iter1, ...),
    so TensorBoard draws them as curves over the iterations, beside train_sppo.py's runs."""
    # purge_step 0: a rerun's numbers replace the earlier run's in TensorBoard instead of doubling them
    report = open_reporter(args.report_to, os.path.join(args.out, "tensorboard"), args.out, {"ranker": args.ranker},
                           purge_step=0)
    for step, r in enumerate(results.values()):
        report({"eval/win_rate": r["win_rate"], "eval/lc_win_rate": r["lc_win_rate"],
                "eval/mean_length": r["mean_length"]}, step)
    report.close()


def plot(path, results, base_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5))
    for key, se, label, shift in (("lc_win_rate", "lc_se", "LC win rate", -0.04), ("win_rate", "se", "win rate", 0.04)):
        ax.errorbar(x + shift, [100 * results[n][key] for n in names], yerr=[100 * results[n][se] for n in names],
                    marker="o", capsize=3, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylabel(f"% wins vs {base_name}")
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# -----------------------------------------------------------------------------

def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                 allow_abbrev=False)  # an abbreviation must not take a flag meant for generate.py
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR (checkpoint directory or hub id), "
                    "in plot order")
    ap.add_argument("--prompts", default=None, help="JSONL of {id, prompt}, or a hub dataset with a prompt column "
                    "(default with --reference-outputs: its instructions)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--ranker", default="llm-blender/PairRM-hf", help="the judge: hub id or local directory of PairRM, "
                    "a reward model or an instruct LLM; or a Python function FILE.py:NAME or package.module:NAME, "
                    "NAME(prompt, response) -> score")
    ap.add_argument("--ranker-kind", choices=("auto",) + KINDS, default="auto",
                    help="pairrm, reward, judge or function (default: function for WHERE:NAME, else read from its "
                    "config.json)")
    ap.add_argument("--judge-template", default=JUDGE_TEMPLATE, help="an LLM judge's prompt, with {prompt}, {first} "
                    "and {second} (default: configs/judge-prompt.txt)")
    ap.add_argument("--baseline", default=None, help="the NAME in --models every model is judged against (default: "
                    "the first); with --reference-outputs, the reference's name (default: its generator field)")
    ap.add_argument("--reference-outputs", default=None, help="AlpacaEval-style JSON [{instruction, output}] as the "
                    "baseline, matched to prompts by instruction text; a prompt without one is an error")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    # judging
    ap.add_argument("--batch-size", type=int, default=None, help="ranker rows per forward (default: 32 cuda, 8 cpu)")
    ap.add_argument("--device", default=None, help="ranker device (default: cuda when available; a judge runs where "
                    "vLLM does)")
    ap.add_argument("--ranker-dtype", choices=DTYPES, default=None, help="default: rank.py's (fp16 for PairRM and bf16 "
                    "for the others on cuda, fp32 on cpu)")
    ap.add_argument("--write-every", type=int, default=256, help="prompts per judging chunk; finished ones are saved")
    ap.add_argument("--verbose", action="store_true", help="show vLLM's INFO log while generating")
    ap.add_argument("--report-to", choices=["tensorboard", "wandb", "none"], default="tensorboard",
                    help="also send the win rates to TensorBoard (OUT/tensorboard) or W&B, one step per model")
    return ap


def check_inputs(args):
    """Everything that can be wrong with the arguments, found before any work: (models, baseline name,
    reference outputs or None, prompts). Writes the reference's instructions as the prompt file."""
    models = parse_models(args.models)
    reference = None
    if args.reference_outputs:
        reference, generator = load_reference(args.reference_outputs)
        base_name = args.baseline or generator or "reference"
        if any(base_name == n for n, _ in models):
            raise InputError(f"--baseline {base_name}: with --reference-outputs the baseline is the reference, "
                             "not one of --models; give it another name")
    else:
        base_name = args.baseline or models[0][0]
        if not any(base_name == n for n, _ in models):
            raise InputError(f"--baseline {base_name}: not one of --models ({', '.join(n for n, _ in models)})")
    if args.prompts is None and reference is None:
        raise InputError("--prompts is required (without --reference-outputs)")
    if args.prompts is None:  # the reference's instructions, in its order, written where generate.py reads them
        prompts = [{"id": prompt_id(x), "prompt": x} for x in reference]
        args.prompts_file = os.path.join(args.out, "prompts.jsonl")
    else:
        prompts = load_prompts(args.prompts)
        args.prompts_file = args.prompts
        if any("messages" in r for r in prompts):  # the judges compare answers to one prompt text
            raise InputError(f"--prompts {args.prompts}: id '{next(r['id'] for r in prompts if 'messages' in r)}' "
                             "is a conversation (messages); evaluate.py judges one-turn prompts (for MT-Bench's "
                             "two turns see answers.py)")
    prompts = prompts[: args.limit]
    if len(prompts) < 2:
        raise InputError(f"{args.prompts or args.reference_outputs}: need at least 2 prompts to estimate a win rate")
    if reference is not None:
        missing = [r["id"] for r in prompts if r["prompt"] not in reference]
        if missing:
            more = ", ..." if len(missing) > 5 else ""
            raise InputError(f"--reference-outputs {args.reference_outputs}: no output for {len(missing)} of "
                             f"{len(prompts)} prompts (ids {', '.join(missing[:5])}{more})")
    args.ranker_kind = detect_kind(args.ranker, args.ranker_kind)
    args.judge_template_text = read_judge_template(args.judge_template) if args.ranker_kind == "judge" else None
    check_preference_path(args.ranker, args.ranker_kind)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {args.out}: cannot create it ({e.strerror})")
    if args.prompts is None:
        write_text(args.prompts_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts))
    return models, base_name, reference, prompts


def ranker_loader(args):
    """A function that loads the preference model on its first call: a rerun with every judgment cached never loads
    it (or torch)."""
    loaded = []

    def ranker():
        if not loaded:
            import torch
            from preference import default_dtype_for, load_preference
            args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = args.ranker_dtype or default_dtype_for(args.ranker_kind, args.device)
            loaded.append(load_preference(args.ranker, args.ranker_kind, args.device, dtype, args.batch_size,
                                          args.judge_template_text))
        return loaded[0]
    return ranker


def score(names, base_name, outputs, kept, args):
    """{name: win rate, its standard error, LC win rate and its standard error, mean length, n} against the baseline."""
    ranker = ranker_loader(args)
    base = outputs[base_name]
    base_len = np.array([len(base[i][1]) for i in kept], dtype=np.float64)
    results = {}
    for name in names:
        out = outputs[name]
        lens = np.array([len(out[i][1]) for i in kept], dtype=np.float64)
        if name == base_name:  # against itself: a tie by definition
            wr, se, lc, lc_se = 0.5, 0.0, 0.5, 0.0
        else:
            o = judge(name, base_name, [(i, out[i][0], out[i][1], base[i][1]) for i in kept], args, ranker)
            wr, se = win_rate(o)
            lc, lc_se = length_controlled_win_rate(o, lens, base_len)
            print(f"evaluate: {name} vs {base_name}: win rate {100 * wr:.2f} ± {100 * se:.2f}%, "
                  f"LC {100 * lc:.2f}%, mean length {lens.mean():.0f} vs {base_len.mean():.0f}", file=sys.stderr)
        results[name] = {"win_rate": wr, "se": se, "lc_win_rate": lc, "lc_se": lc_se,
                         "mean_length": float(lens.mean()), "n": len(kept)}
    return results


def main():
    args, args.generate_args = parser().parse_known_args()  # the rest is generate.py's: --max-tokens, --engine, ...
    models, base_name, reference, prompts = check_inputs(args)
    ids = [r["id"] for r in prompts]
    t0 = time.time()

    # 1. responses
    outputs = {name: read_outputs(generate(name, model, args, set(ids))) for name, model in models}
    if reference is not None:
        outputs[base_name] = {r["id"]: (r["prompt"], reference[r["prompt"]]) for r in prompts}
    # generate.py skips prompts longer than a model's context: compare every model on the same prompts.
    kept = [i for i in ids if all(i in out for out in outputs.values())]
    if len(kept) < len(ids):
        print(f"warning: {len(ids) - len(kept)} of {len(ids)} prompts have no response from some model "
              "(longer than its context); they are left out", file=sys.stderr)
    if len(kept) < 2:
        raise InputError("fewer than 2 prompts were answered by every model")

    # 2. judgments, win rates
    names = ([base_name] if reference is not None else []) + [n for n, _ in models]
    results = score(names, base_name, outputs, kept, args)

    # 3. write
    write_json(os.path.join(args.out, "results.json"),
               {"baseline": base_name, "ranker": args.ranker, "ranker_kind": args.ranker_kind, "prompts": args.prompts or args.reference_outputs,
                "n_prompts": len(kept), "length_unit": "characters", "models": results})
    report_win_rates(results, args)
    table = markdown_table(results, base_name, args.ranker, args.ranker_kind)
    write_text(os.path.join(args.out, "results.md"), table)
    plot(os.path.join(args.out, "winrate.png"), results, base_name)
    for name, _ in models:
        rows = [{"instruction": outputs[name][i][0], "output": outputs[name][i][1], "generator": name} for i in kept]
        write_json(os.path.join(args.out, "alpaca_eval", name, "model_outputs.json"), rows)
    if alpaca_eval_misaligned(reference, [row["instruction"] for row in rows]):  # the exported instructions
        print(f"warning: {args.out}/alpaca_eval/*/model_outputs.json are not AlpacaEval's 805 instructions in its "
              "order: AlpacaEval's own length-controlled win rate, which looks up instruction difficulty by row "
              "position, would misalign on them (its raw win rate would not)", file=sys.stderr)
    print(table)
    print(f"evaluate: {len(models)} models on {len(kept)} prompts in {time.time() - t0:.1f}s -> {args.out}",
          file=sys.stderr)
    print(f"plot: {os.path.join(args.out, 'winrate.png')}  table: {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    main_guard(main)
