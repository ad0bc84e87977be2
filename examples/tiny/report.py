"""The demo's report: what SPPO did to the tiny policy, iteration by iteration, as a page a student can read.

    python examples/tiny/report.py --run runs/tiny          # what `make demo` runs at its end
    python examples/tiny/report.py --compare sppo=runs/tiny dpo=runs/tiny-dpo ipo=runs/tiny-ipo --out runs/compare
                                                            # what `make compare` runs at its end

Reads only what run_loop.sh and evaluate.py wrote under RUN:
    RUN/iterT/ranked.jsonl                       the K responses sampled from the policy iteration T starts
                                                 from, and the win rate W of each among them
    RUN/iterT/checkpoint/train_log.jsonl         one line per optimizer step (loss, log-ratios)
    RUN/iterT/checkpoint/reference_logps.jsonl   which responses were trained (id, response index)
    RUN/iterT/checkpoint/sppo_train.json         the training settings (eta, loss)
    RUN/eval/results.json, outputs/NAME.jsonl, judgments/NAME_vs_BASE.jsonl
and writes RUN/report.md with its figures beside it (RUN/report_*.png); --compare reads only each run's eval/
and writes one table and one figure (OUT/compare.md, OUT/compare.png). The hidden rule of the tiny world
(world.judge_score, which SPPO never sees) is applied here, to show what the judge's verdicts are worth.
"""
import argparse
import glob
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import world  # noqa: E402
from evaluate import text_hash  # noqa: E402  (how evaluate.py keys its cached judgments)


RULES = {1: ("+1 for closing with \"Hope this helps!\", -1 per \"Um,\" filler", 1),
         2: ("+1 for closing with \"Hope this helps!\", +0.5 for opening with \"Sure!\", -0.5 per \"Um,\" filler, "
             "up to +0.5 for detail (sentences naming two qualities); the judge also likes length a little", 2)}


def world_version(run):
    """Which rule of world.py the run's world was built with: WORLD/world.json beside the base policy (the
    MODEL of RUN/settings.txt); worlds built before v2 existed have none and are v1."""
    root = os.path.dirname(os.path.dirname(HERE))  # run_loop.sh writes paths relative to the repository
    with open(os.path.join(run, "settings.txt")) as f:
        model = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)["MODEL"]
    path = os.path.join(root, os.path.dirname(model.rstrip("/")), "world.json")
    if not os.path.exists(path):
        return 1
    with open(path) as f:
        return json.load(f)["version"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# load

def load_iteration(run, t, version):
    """One iteration's numbers: the W of every sampled response, the trained picks and their targets, the log."""
    ckpt = os.path.join(run, f"iter{t}", "checkpoint")
    ranked = {str(r["id"]): r for r in read_jsonl(os.path.join(run, f"iter{t}", "ranked.jsonl"))}
    with open(os.path.join(ckpt, "sppo_train.json")) as f:
        settings = json.load(f)["settings"]
    eta, loss = settings["eta"], settings.get("loss", "sppo")
    # The trained responses are the ones train_sppo.py wrote reference log-probs for (best and worst by W, or
    # all): their SPPO targets eta (W - 1/2) are what the log-ratios log pi/pi_t are pulled towards.
    picks = [ranked[str(r["id"])]["win_rate"][r["response"]] for r in read_jsonl(os.path.join(ckpt, "reference_logps.jsonl"))]
    target = eta * (np.array(picks) - 0.5)
    responses = [y for r in ranked.values() for y in r["responses"]]
    return {"t": t, "eta": eta, "loss": loss, "log": read_jsonl(os.path.join(ckpt, "train_log.jsonl")),
            "W": np.array([w for r in ranked.values() for w in r["win_rate"]]),
            "target_pos": float(target[target > 0].mean()) if (target > 0).any() else 0.0,
            "target_neg": float(target[target < 0].mean()) if (target < 0).any() else 0.0,
            # prompts on which the judge finds nothing to choose between the K samples: W spread under 0.1
            "alike": float(np.mean([max(r["win_rate"]) - min(r["win_rate"]) < 0.1 for r in ranked.values()])),
            "n_prompts": len(ranked), "k": len(next(iter(ranked.values()))["responses"]),
            "length": float(np.mean([len(y) for y in responses])),
            "rule": float(np.mean([world.judge_score(y, version) for y in responses]))}


def load_eval(run, version):
    """results.json's models, each with its answers {id: (prompt, answer)} and the hidden rule's mean; how they
    were decoded (evaluate.py decodes greedily unless told otherwise)."""
    with open(os.path.join(run, "eval", "results.json")) as f:
        results = json.load(f)
    for name, r in results["models"].items():
        rows = read_jsonl(os.path.join(run, "eval", "outputs", f"{name}.jsonl"))
        r["answers"] = {str(x["id"]): (x["prompt"], x["responses"][0]) for x in rows}
        t = rows[0].get("generate", {}).get("temperature", 0)
        results["decoding"] = "greedy" if not t else f"sampled at T={t:g}"
        r["rule"] = float(np.mean([world.judge_score(a, version) for _, a in r["answers"].values()]))
    return results


def judged_outcome(run, name, base, rid, answer, base_answer):
    """The judge's soft win of `answer` over the baseline's on one prompt, as evaluate.py cached it."""
    if name == base or answer == base_answer:
        return 0.5
    key = f"{rid}:{text_hash(answer)}:{text_hash(base_answer)}"
    path = os.path.join(run, "eval", "judgments", f"{name}_vs_{base}.jsonl")
    return next((r["outcome"] for r in read_jsonl(path) if r["id"] == key), float("nan"))


# -----------------------------------------------------------------------------
# figures (each function draws one PNG and returns its file name)

def save(fig, run, name, rect=(0, 0, 1, 1)):
    fig.tight_layout(rect=rect)
    fig.savefig(os.path.join(run, name), dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return name


def fig_winrate(run, ev, names, best):
    import matplotlib.pyplot as plt
    m = ev["models"]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, se, label in (("win_rate", "se", "win rate"), ("lc_win_rate", "lc_se", "length-controlled (LC)")):
        a.errorbar(x, [100 * m[n][key] for n in names], yerr=[100 * m[n][se] for n in names], marker="o",
                   capsize=3, label=label)
    a.axhline(50, color="grey", lw=0.8, ls="--")
    a.set(xticks=x, xticklabels=names, ylabel=f"% of prompts won against {ev['baseline']}", ylim=(0, 102),
          title="What the judge (tiny ranker) says")
    a.legend(loc="lower right")
    b.plot(x, [m[n]["rule"] for n in names], marker="s", color="tab:green")
    b.axhline(best, color="grey", lw=0.8, ls="--")
    b.set(xticks=x, xticklabels=names, ylabel=f"mean hidden score (best: {best})", title="What the hidden rule says")
    return save(fig, run, "report_winrate.png")


def fig_training(run, its):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, len(its), figsize=(3.4 * len(its) + 0.6, 5.6), sharex="col", squeeze=False)
    top = max(max(s["loss"] for s in it["log"]) for it in its)
    for j, it in enumerate(its):
        steps = [s["step"] for s in it["log"]]
        a, b = axes[0, j], axes[1, j]
        a.plot(steps, [s["loss"] for s in it["log"]], color="black")
        a.set(title=f"iteration {it['t']}", ylim=(0, 1.05 * top))
        b.plot(steps, [s["log_ratio_pos"] for s in it["log"]], color="tab:blue", label="W > 1/2 (winners)")
        b.plot(steps, [s["log_ratio_neg"] for s in it["log"]], color="tab:red", label="W < 1/2 (losers)")
        if it["loss"] == "sppo":  # DPO and IPO have no per-response target
            b.axhline(it["target_pos"], color="tab:blue", ls="--", lw=1, label="their mean target")
            b.axhline(it["target_neg"], color="tab:red", ls="--", lw=1, label="their mean target")
        b.axhline(0, color="grey", lw=0.6)
        b.set(xlabel="optimizer step")
        b.xaxis.set_major_locator(MaxNLocator(integer=True))
        if j == 0:
            a.set_ylabel(f"{its[0]['loss'].upper()} loss")
            b.set_ylabel("log pi(y|x) - log pi_t(y|x)")
    fig.legend(*axes[1, 0].get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False)
    return save(fig, run, "report_training.png", rect=(0, 0.06, 1, 1))  # room for the legend under the panels


def fig_W(run, its):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(its), figsize=(3.6 * len(its) + 0.6, 3.3), sharey=True, squeeze=False)
    bins = np.linspace(0, 1, 21)
    for a, it in zip(axes[0], its):
        a.hist(it["W"], bins=bins, color="tab:purple", weights=np.full(len(it["W"]), 100 / len(it["W"])))
        a.axvline(0.5, color="grey", lw=0.8, ls="--")
        a.set(title=f"iteration {it['t']}: spread (sd) {it['W'].std():.2f}\n{100 * it['alike']:.0f}% of prompts all alike",
              xlabel="W (win rate among the K samples)")
    axes[0, 0].set_ylabel("% of sampled responses")
    return save(fig, run, "report_W.png")


def fig_length(run, its, ev, names):
    import matplotlib.pyplot as plt
    fig, a = plt.subplots(figsize=(5.5, 3.4))
    # iteration t samples from the policy it starts from: base for t = 1, iter(t-1) after
    a.plot(range(len(its)), [it["length"] for it in its], marker="o", label="sampled from it (the next training data)")
    a.plot(range(len(names)), [ev["models"][n]["mean_length"] for n in names], marker="s", label=f"{ev['decoding']}, held-out")
    a.set(xticks=range(len(names)), xticklabels=names, xlabel="policy", ylabel="mean response length (characters)",
          ylim=(0, None))
    a.legend(loc="lower right")
    return save(fig, run, "report_length.png")


# -----------------------------------------------------------------------------
# the page

def pick_prompt(ev, names, version):
    """A held-out prompt whose answer changes most in hidden score from the first model to the last."""
    first, last = ev["models"][names[0]]["answers"], ev["models"][names[-1]]["answers"]
    return max(sorted(first), key=lambda i: world.judge_score(last[i][1], version) - world.judge_score(first[i][1], version))


def agreement(m, names):
    """A sentence on whether the judge's win rate and the hidden rule moved together from model to model."""
    def moved(a, b, key, small):  # +1, -1, or 0 for a change too small to call
        d = m[b][key] - m[a][key]
        return 0 if abs(d) < small else (1 if d > 0 else -1)
    split = [f"{a} to {b}" for a, b in zip(names, names[1:])
             if moved(a, b, "win_rate", 0.01) != moved(a, b, "rule", 0.05)]
    if not split:
        return "The two move together: the judge's verdicts track the truth, because the ranker learned the rule."
    return (f"They do not move together from {', '.join(split)} (one flat or down while the other moves): the "
            "judge is an imitation of the rule, with its own errors and, in world v2, a liking for length.")


def held_out(ev):
    """'the 60 held-out prompts once', or with world v2's repeated prompts 'the 240 held-out prompts (60
    questions, each asked 4 times)'."""
    n, texts = ev["n_prompts"], len({p for p, _ in next(iter(ev["models"].values()))["answers"].values()})
    return (f"{n} held-out prompts once" if texts == n else
            f"{n} held-out prompts ({texts} questions, each asked {n // texts} times)")


def md_text(s):
    return s.replace("|", "\\|").replace("\n", " ")


def section_winrate(run, its, ev, figs, version):
    """The page's opening and section 1: the win-rate table, its figure and what to see in it."""
    names, m, base, it0 = list(ev["models"]), ev["models"], ev["baseline"], its[0]
    rule, best = RULES[version]
    first, last = names[0], names[-1]
    out = [f"# The tiny demo: {len(its)} iterations of {it0['loss'].upper()}", "",
           f"Run directory `{run}`: {it0['n_prompts']} training prompts x K = {it0['k']} sampled responses per "
           f"iteration, eta = {it0['eta']:g}. Everything below is read from the files the loop and evaluate.py "
           f"wrote; the *hidden rule* of tiny world v{version} (`world.judge_score`: {rule}) is the truth the "
           "tiny ranker was trained to imitate, and SPPO never sees it.", "",
           "## 1. Win rate against the base policy", "",
           "| model | win rate (%) | LC win rate (%) | mean length (chars) | hidden score (mean) |",
           "|---|---|---|---|---|"]
    for n in names:
        r = m[n]
        out.append(f"| {n} | {100 * r['win_rate']:.1f} ± {100 * r['se']:.1f} | {100 * r['lc_win_rate']:.1f} ± "
                   f"{100 * r['lc_se']:.1f} | {r['mean_length']:.0f} | {r['rule']:+.2f} |")
    out += ["", f"![win rate]({figs['winrate']})", "",
            f"Each model answers the {held_out(ev)}, {ev['decoding']}; the judge (the tiny ranker, "
            f"in both orders) compares each answer with {base}'s on the same prompt, and the win rate is the "
            f"share of prompts won (a tie counts half). {base} against itself is 50% by definition. What to see: "
            f"the win rate goes from 50% to {100 * m[last]['win_rate']:.0f}% by {last}, and the hidden score "
            f"(right) from {m[first]['rule']:+.2f} to {m[last]['rule']:+.2f}. " + agreement(m, names) + " LC is the "
            "win rate the model would have at equal length; here it is within "
            f"{max(100 * abs(m[n]['win_rate'] - m[n]['lc_win_rate']) for n in names):.1f} points of the raw one at "
            "every iteration. A gap between the two means part of the wins came from writing longer (or shorter) "
            "answers than the base, which a judge that likes length rewards.", "",
            "## 2. Training curves", "",
            f"![training curves]({figs['training']})", ""]
    return out


def section_training(run, its, ev, figs, version):
    """Section 2: the training curves, read against the loss that made them."""
    it0, out = its[0], []
    if it0["loss"] == "sppo":
        out += ["Top: the SPPO loss, the mean of (log pi(y|x) - log pi_t(y|x) - eta (W - 1/2))^2 over the "
                "best and worst response of each prompt. Bottom: the mean log-ratio log pi(y|x) - log pi_t(y|x) "
                "of the winners (W > 1/2, blue) and the losers (W < 1/2, red), and dashed, the mean target "
                "eta (W - 1/2) of each group. What to see: both log-ratios start at exactly 0 (the policy is "
                "its own reference at step 1, so the first loss is the mean squared target), then move "
                "apart, winners up and losers down, towards their targets. They need not reach them: "
                "SPPO's squared loss stops pulling as soon as a log-ratio equals its target, so unlike DPO it "
                "cannot push the losers' probability to zero. Lower targets (the targets shrink as W "
                "bunches up near 1/2) mean a smaller step for the next iteration.", "",
                "At the last step: " + "; ".join(
                    f"iteration {it['t']}: winners {it['log'][-1]['log_ratio_pos']:+.2f} (target "
                    f"{it['target_pos']:+.2f}), losers {it['log'][-1]['log_ratio_neg']:+.2f} (target "
                    f"{it['target_neg']:+.2f})" for it in its) + ".", ""]
    else:
        out += [f"Top: the {it0['loss'].upper()} loss over the best/worst pairs. Bottom: the mean log-ratio "
                "log pi(y|x) - log pi_t(y|x) of the winners (blue) and losers (red). The pair losses only see "
                "the difference of the two; nothing anchors either one.", ""]
    return out


def section_samples(run, its, ev, figs, version):
    """Sections 3 and 4: the judge's view of the policy's own samples (W), and length."""
    it0, out = its[0], []
    out += ["## 3. How the judge sees the policy's own samples", "",
            f"![distribution of W]({figs['W']})", "",
            "Each iteration samples K responses per training prompt from the current policy, and the judge "
            "scores every pair: W is a response's mean win probability against its K siblings (its own 1/2 "
            "included), so W averages exactly 1/2 on every prompt and only its spread carries information. A "
            "prompt whose samples are all alike to the judge gives every one W = 1/2 and SPPO nothing to learn "
            "(every target eta (W - 1/2) is 0). "
            + (f"With K = {it0['k']} and a decisive judge (world v1), a prompt with one bad sample among good ones "
               f"gives the good ones W near {(0.5 * (it0['k'] - 1) + 1) / it0['k']:.1f} and the bad one W near "
               f"{0.5 / it0['k']:.1f}. What to see: how the mass moves from a broad spread (many good and bad "
               "samples mixed) towards good majorities with rare bad outliers, and how the share of all-alike "
               "prompts (W spread under 0.1) grows: " if version == 1 else
               "World v2's judge is soft (a small difference in quality wins only a little more often than not), "
               "so W stays well inside 0-1. What to see: the spread of W, which narrows as the samples grow "
               "alike (standard deviation " + ", ".join(f"{it['W'].std():.2f}" for it in its) + "), and the "
               "share of all-alike prompts (W spread under 0.1): ")
            + ", ".join(f"{100 * it['alike']:.0f}%" for it in its) + " in iterations "
            + ", ".join(str(it["t"]) for it in its) + ". All samples alike on every prompt is what the Nash "
            "equilibrium looks like from inside: no response of the policy is preferred to another, so SPPO's "
            "updates stop. At temperature 0.7 a policy keeps sampling some bad answers long after its most likely "
            "answer is good.", "",
            "## 4. Length", "",
            f"![mean length]({figs['length']})", "",
            "Mean length in characters of the sampled training responses (the policy each iteration starts "
            f"from) and of the held-out answers ({ev['decoding']}). What to see: whether the gains came with longer "
            "answers. A sign-off adds 17 characters and a filler 4, so here a better answer can be longer or "
            "shorter; real judges (PairRM, GPT-4) favour longer answers, which is why AlpacaEval reports LC"
            + (" and why the v2 judge has a mild length bias: a policy can then gain raw win rate by writing "
               "longer, which LC discounts and the hidden score does not reward." if version == 2 else "."), "",
            "Per iteration, the sampled training responses: "
            + "; ".join(f"iteration {it['t']}: mean length {it['length']:.0f}, hidden score {it['rule']:+.2f}"
                        for it in its) + ".", ""]

    return out


def off_topic(prompt, answers):
    """A sentence when an answer talks about another topic than the prompt's: nothing rewards staying on topic."""
    topic = world.topic_of(prompt)
    if topic is None or all(topic in a.lower() for a in answers):
        return ""
    return (f" Some answers are not about {topic} at all: the hidden rule, and so the judge, never asks whether "
            "an answer is on topic, so SPPO has no reason to fix that. A policy learns what its judge rewards, "
            "not what its users meant, which is why the choice of preference model matters so much.")


def section_prompt(run, its, ev, figs, version, prompt_id):
    """Section 5: one held-out prompt's answers across iterations, with both scores."""
    names, m, base, out = list(ev["models"]), ev["models"], ev["baseline"], []
    rid = prompt_id or pick_prompt(ev, names, version)
    prompt, base_answer = m[base]["answers"][rid][0], m[base]["answers"][rid][1]
    out += ["## 5. One held-out prompt across iterations", "", f"Prompt `{rid}`: **{md_text(prompt)}**", "",
            f"| model | answer ({ev['decoding']}) | judge: P(wins vs {base}) | hidden score |", "|---|---|---|---|"]
    for n in names:
        answer = m[n]["answers"][rid][1]
        o = judged_outcome(run, n, base, rid, answer, base_answer)
        out.append(f"| {n} | {md_text(answer)} | {o:.2f} | {world.judge_score(answer, version):+.2g} |")
    out += ["", "The judge's column is its soft verdict against the base answer on this prompt (both orders "
            "averaged; 0.50 for the base itself or an identical answer), the last column the hidden rule. "
            "The prompt shown is the one whose answer gained most by the hidden rule; pass --prompt-id to "
            "see another." + off_topic(prompt, [m[n]["answers"][rid][1] for n in names]), ""]
    return out


def report(run, prompt_id=None):
    """OUT/report.md and its figures, from the files the loop and evaluate.py wrote; returns the page's path."""
    import matplotlib
    matplotlib.use("Agg")
    ts = sorted(int(m.group(1)) for d in glob.glob(os.path.join(run, "iter*", "checkpoint"))
                if (m := re.search(r"iter(\d+)", os.path.basename(os.path.dirname(d)))))
    version = world_version(run)
    best = RULES[version][1]
    its = [load_iteration(run, t, version) for t in ts]
    ev = load_eval(run, version)
    names = list(ev["models"])  # evaluate.py's order: base, iter1, iter2, ...
    figs = {"winrate": fig_winrate(run, ev, names, best), "training": fig_training(run, its), "W": fig_W(run, its),
            "length": fig_length(run, its, ev, names)}

    sections = (section_winrate, section_training, section_samples)
    out = sum((f(run, its, ev, figs, version) for f in sections), []) + section_prompt(run, its, ev, figs, version,
                                                                                       prompt_id)
    path = os.path.join(run, "report.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    os.replace(path + ".tmp", path)
    return path


# -----------------------------------------------------------------------------
# make compare: several methods' runs from the same base, side by side

def compare(runs, out):
    """runs: [(method, RUN)], each evaluated against the same base; writes OUT/compare.md and OUT/compare.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals = {method: load_eval(run, world_version(run)) for method, run in runs}
    os.makedirs(out, exist_ok=True)
    best = RULES[world_version(runs[0][1])][1]
    panels = (("win_rate", "win rate vs base (%)", 100), ("lc_win_rate", "LC win rate vs base (%)", 100),
              ("mean_length", "mean length (characters)", 1), ("rule", f"hidden score (best: {best})", 1))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for method, ev in evals.items():
        names = list(ev["models"])
        for a, (key, label, scale) in zip(axes, panels):
            a.plot(range(len(names)), [scale * ev["models"][n][key] for n in names], marker="o", label=method.upper())
            a.set(xticks=range(len(names)), xticklabels=["base"] + [str(i) for i in range(1, len(names))],
                  xlabel="iteration", title=label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=110)
    plt.close(fig)

    lines = ["# SPPO against iterative DPO and IPO on the tiny world", "",
             "The same base policy, prompts, samples per prompt and judge; only the loss differs (train_sppo.py "
             "--loss). Each method's held-out answers are judged against the base policy's; the hidden "
             "score is the tiny world's rule (world.judge_score), which no method sees.", "",
             "| method | iteration | win rate (%) | LC win rate (%) | mean length (chars) | hidden score |",
             "|---|---|---|---|---|---|"]
    for method, ev in evals.items():
        for i, (n, r) in enumerate(ev["models"].items()):
            if i == 0 and method != next(iter(evals)):
                continue  # the base is the same for every method: one row
            lines.append(f"| {method.upper() if i else 'base'} | {i or '-'} | {100 * r['win_rate']:.1f} ± "
                         f"{100 * r['se']:.1f} | {100 * r['lc_win_rate']:.1f} ± {100 * r['lc_se']:.1f} | "
                         f"{r['mean_length']:.0f} | {r['rule']:+.2f} |")
    lines += ["", "![compare](compare.png)", "",
              "What this run shows: " + leaders(evals) + " " + hacks(evals) + " Read it against the paper (Wu et al., 2024: on "
              "AlpacaEval 2.0 with Mistral-7B-Instruct, SPPO's LC win rate rises every iteration, 17.1 to 28.5%, "
              "and ends ahead of iterative DPO and IPO trained on the same data). Here the judge is a small "
              "ranker that knows one rule and the policy a toy: who wins is settled by how fast each loss moves "
              "the policy and where it stops, not by anything AlpacaEval measures.", ""]
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return os.path.join(out, "compare.md")


def leaders(evals):
    """One sentence per iteration: which method has the highest LC win rate, by how much, and whether that
    lead is more than twice its standard error (the two methods' errors combined)."""
    out = []
    for i in range(1, min(len(ev["models"]) for ev in evals.values())):
        rows = sorted(((list(ev["models"].values())[i], m) for m, ev in evals.items()),
                      key=lambda x: -x[0]["lc_win_rate"])
        (a, ma), (b, mb) = rows[0], rows[1]
        lead, se = 100 * (a["lc_win_rate"] - b["lc_win_rate"]), 100 * np.hypot(a["lc_se"], b["lc_se"])
        out.append(f"at iteration {i} {ma.upper()} leads in LC ({100 * a['lc_win_rate']:.1f}%) by {lead:.1f} "
                   f"points over {mb.upper()} ({'beyond' if lead > 2 * se else 'within'} twice the standard error "
                   f"of the difference, {se:.1f})")
    return "; ".join(out) + "."


def hacks(evals):
    """Where a method's win rate rose from one iteration to the next while the hidden rule's score fell: the
    judge and the truth part ways (the learned judge is only an imitation of the rule)."""
    out = []
    for method, ev in evals.items():
        m = list(ev["models"].items())
        for (a, ra), (b, rb) in zip(m, m[1:]):
            if rb["win_rate"] > ra["win_rate"] and rb["rule"] < ra["rule"] - 0.1:
                out.append(f"{method.upper()}'s win rate rose from {a} to {b} ({100 * ra['win_rate']:.1f} to "
                           f"{100 * rb['win_rate']:.1f}%) while its hidden score fell ({ra['rule']:+.2f} to "
                           f"{rb['rule']:+.2f})")
    if not out:
        return "No method's hidden score fell while its win rate rose."
    return ("; ".join(out) + ": the policy moved to answers that the learned judge still rewards and the hidden "
            "rule does not (read them in RUN/eval/outputs). With a pair loss, look at the winners' log-ratio in "
            "that run's training figure: below zero, the probability taken from both answers of a pair went to "
            "answers nobody trained on, and nothing but the judge's blind spots decides what they are.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny", help="the loop's OUT directory (with eval/ inside)")
    ap.add_argument("--prompt-id", default=None, help="the held-out prompt to follow (default: the most improved)")
    ap.add_argument("--compare", nargs="+", metavar="METHOD=RUN", help="instead: compare these runs (each with "
                    "eval/ against the same base) into --out")
    ap.add_argument("--out", default="runs/compare", help="with --compare: where compare.md and compare.png go")
    args = ap.parse_args()
    if args.compare:
        print(f"compare: {compare([spec.split('=', 1) for spec in args.compare], args.out)}")
    else:
        print(f"report: {report(args.run, args.prompt_id)}")


if __name__ == "__main__":
    main()
