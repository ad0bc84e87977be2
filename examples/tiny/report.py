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
import platform
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
    path = os.path.join(root, os.path.dirname(run_setting(run, "MODEL").rstrip("/")), "world.json")
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
    trained = [ranked[str(r["id"])] for r in read_jsonl(os.path.join(ckpt, "reference_logps.jsonl"))]
    picks = [r["response"] for r in read_jsonl(os.path.join(ckpt, "reference_logps.jsonl"))]
    W_trained = np.array([r["win_rate"][i] for r, i in zip(trained, picks)])
    target = eta * (W_trained - 0.5)
    length = np.array([len(r["responses"][i]) for r, i in zip(trained, picks)], dtype=np.float64)
    responses = [y for r in ranked.values() for y in r["responses"]]
    return {"t": t, "eta": eta, "loss": loss, "log": read_jsonl(os.path.join(ckpt, "train_log.jsonl")),
            "W": np.array([w for r in ranked.values() for w in r["win_rate"]]), "W_trained": W_trained,
            "target_pos": float(target[target > 0].mean()) if (target > 0).any() else 0.0,
            "target_neg": float(target[target < 0].mean()) if (target < 0).any() else 0.0,
            "target_size": float(np.abs(target).mean()),
            # the lengths the judge's choices push towards: trained up (W > 1/2) against trained down (W < 1/2)
            "length_pos": float(length[target > 0].mean()) if (target > 0).any() else float("nan"),
            "length_neg": float(length[target < 0].mean()) if (target < 0).any() else float("nan"),
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


_OUTCOMES = {}  # judgments file -> {key: outcome}, read once


def judged_outcome(run, name, base, rid, answer, base_answer):
    """The judge's soft win of `answer` over the baseline's on one prompt, as evaluate.py cached it."""
    if name == base or answer == base_answer:
        return 0.5
    path = os.path.join(run, "eval", "judgments", f"{name}_vs_{base}.jsonl")
    if path not in _OUTCOMES:
        _OUTCOMES[path] = {r["id"]: r["outcome"] for r in read_jsonl(path)} if os.path.exists(path) else {}
    return _OUTCOMES[path].get(f"{rid}:{text_hash(answer)}:{text_hash(base_answer)}", float("nan"))


def share_won(run, ev, name):
    """The share of held-out prompts the judge gives to `name` (outcome above 1/2; exactly 1/2 counts half),
    beside the win rate, which is the mean of the outcomes themselves (an expected win rate)."""
    base = ev["baseline"]
    o = np.array([judged_outcome(run, name, base, rid, a, ev["models"][base]["answers"][rid][1])
                  for rid, (_, a) in ev["models"][name]["answers"].items()])
    return float(np.mean((o > 0.5) + 0.5 * (o == 0.5))) if not np.isnan(o).any() else float("nan")


def moves(values, up, down, fmt="{:.2f}", tol=0.0):
    """How a series moves, in words computed from it: 'narrows from 0.13 to 0.10', 'widens from 0.13 to 0.14,
    then narrows to 0.10', 'stays at about 0.13'. The words follow the numbers as printed (fmt), so they never
    contradict them; a change of at most tol (in printed units) counts as staying."""
    values = [float(fmt.format(v).rstrip("%")) for v in values]  # as the reader sees them
    if len(values) < 2:
        return f"is {fmt.format(values[0])}"
    steps = [0 if abs(b - a) <= tol else (1 if b > a else -1) for a, b in zip(values, values[1:])]
    out, i = [], 0
    while i < len(steps):  # one phrase per run of equal directions
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[i]:
            j += 1
        word = {1: up, -1: down, 0: "stays at about"}[steps[i]]
        if steps[i] == 0:
            out.append(f"{word} {fmt.format(values[i])}")
        elif not out:
            out.append(f"{word} from {fmt.format(values[i])} to {fmt.format(values[j + 1])}")
        else:
            out.append(f"{word} to {fmt.format(values[j + 1])}")
        i = j + 1
    return ", then ".join(out)


def versus(value, target, tol=0.1):
    """Where a group's mean log-ratio ended against its mean target: 'past it', 'at it' (within tol of the
    target's size), 'short of it', or 'the wrong way' (the other side of 0)."""
    if target == 0:
        return "no target"
    r = value / target
    return "the wrong way" if r <= 0 else "short of it" if r < 1 - tol else "at it" if r <= 1 + tol else "past it"


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
    for key, se, label in (("win_rate", "se", "win rate (expected)"), ("lc_win_rate", "lc_se", "length-controlled (LC)")):
        a.errorbar(x, [100 * m[n][key] for n in names], yerr=[100 * m[n][se] for n in names], marker="o",
                   capsize=3, label=label)
    a.plot(x, [100 * m[n]["share_won"] for n in names], ls=":", marker=".", color="grey", label="share won")
    a.axhline(50, color="grey", lw=0.8, ls="--")
    a.set(xticks=x, xticklabels=names, ylabel=f"% against {ev['baseline']}", ylim=(0, 102),
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
        idle = warmup_steps(it["log"])
        if idle:  # the warm-up's first steps update nothing: the log-ratios stay 0 one step longer
            b.axvspan(0.5, idle + 0.5, color="0.88", lw=0, label="learning rate 0 (warm-up)")
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
    handles = axes[1, 0].get_legend_handles_labels()
    rows = 1 if len(its) >= 3 or len(handles[0]) <= 3 else 2  # one row of entries where the figure is wide enough
    fig.legend(*handles, loc="lower center", ncol=-(-len(handles[0]) // rows), frameon=False)
    return save(fig, run, "report_training.png", rect=(0, 0.05 * rows + 0.01, 1, 1))  # room for the legend below


def warmup_steps(log):
    """How many leading steps ran at learning rate 0 (HF's warm-up starts at 0); logs without lr: none known."""
    n = 0
    while n < len(log) and log[n].get("lr", 1) == 0:
        n += 1
    return n  # room for the legend under the panels


def fig_W(run, its):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(its), figsize=(3.6 * len(its) + 0.6, 3.3), sharey=True, squeeze=False)
    bins = np.linspace(0, 1, 21)
    for a, it in zip(axes[0], its):
        a.hist(it["W"], bins=bins, color="thistle", weights=np.full(len(it["W"]), 100 / len(it["W"])),
               label=f"all K = {it['k']} samples")
        a.hist(it["W_trained"], bins=bins, histtype="step", lw=1.6, color="tab:purple",
               weights=np.full(len(it["W_trained"]), 100 / len(it["W_trained"])), label="the trained ones")
        a.axvline(0.5, color="grey", lw=0.8, ls="--")
        a.set(title=f"iteration {it['t']}: spread (sd) {it['W'].std():.2f}\n{100 * it['alike']:.0f}% of prompts all alike",
              xlabel="W (win rate among the K samples)")
    axes[0, 0].set_ylabel("% of each group")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    return save(fig, run, "report_W.png")


def fig_length(run, its, ev, names):
    import matplotlib.pyplot as plt
    fig, a = plt.subplots(figsize=(5.5, 3.4))
    a.plot(range(len(names)), [ev["models"][n]["mean_length"] for n in names], marker="s", color="black",
           label=f"held-out answers ({ev['decoding']})")
    # iteration t samples from the policy it starts from (base for t = 1): its trained winners and losers
    a.plot(range(len(its)), [it["length_pos"] for it in its], marker="^", color="tab:blue",
           label="its samples trained up (W > 1/2)")
    a.plot(range(len(its)), [it["length_neg"] for it in its], marker="v", color="tab:red",
           label="its samples trained down (W < 1/2)")
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
    won = {n: m[n]["share_won"] for n in names}
    out = [f"# The tiny demo: {len(its)} iterations of {it0['loss'].upper()}", "",
           f"Run directory `{run}`: {it0['n_prompts']} training prompts x K = {it0['k']} sampled responses per "
           f"iteration, eta = {it0['eta']:g}. Everything below is read from the files the loop and evaluate.py "
           f"wrote; the *hidden rule* of tiny world v{version} (`world.judge_score`: {rule}) is the truth the "
           "tiny ranker was trained to imitate, and SPPO never sees it.", "",
           "## 1. Win rate against the base policy", "",
           "| model | win rate (%) | share won (%) | LC win rate (%) | mean length (chars) | hidden score (mean) |",
           "|---|---|---|---|---|---|"]
    for n in names:
        r = m[n]
        out.append(f"| {n} | {100 * r['win_rate']:.1f} ± {100 * r['se']:.1f} | {100 * won[n]:.1f} | "
                   f"{100 * r['lc_win_rate']:.1f} ± {100 * r['lc_se']:.1f} | {r['mean_length']:.0f} | {r['rule']:+.2f} |")
    out += ["", f"![win rate]({figs['winrate']})", "",
            f"Each model answers the {held_out(ev)}, {ev['decoding']}; the judge (the tiny ranker, "
            f"in both orders) gives each answer a probability of beating {base}'s answer to the same prompt. The "
            "win rate is the mean of those probabilities, an *expected* win rate (as AlpacaEval 2.0 computes its "
            "own): a sure win counts 1, a toss-up 1/2, a 0.7 counts 0.7. The share won (dotted) counts a prompt as won "
            "when that probability is above 1/2 (exactly 1/2 counts half); it moves further than the win rate "
            f"when the judge is unsure of many answers. {base} against itself is 50% by definition. What to see: "
            f"the win rate {moves([100 * m[n]['win_rate'] for n in names], 'rises', 'falls', '{:.0f}%')} "
            f"(share won {moves([100 * won[n] for n in names], 'rises', 'falls', '{:.0f}%')}), and the hidden "
            f"score (right) {moves([m[n]['rule'] for n in names], 'rises', 'falls', '{:+.2f}')}. "
            + agreement(m, names) + " LC is the "
            "win rate the model would have at equal length; here it is within "
            f"{max(100 * abs(m[n]['win_rate'] - m[n]['lc_win_rate']) for n in names):.1f} points of the raw one at "
            "every iteration. A gap between the two means part of the wins came from writing longer (or shorter) "
            "answers than the base, which a judge that likes length rewards.", "",
            "## 2. Training curves", "",
            f"![training curves]({figs['training']})", ""]
    return out


def section_training(run, its, ev, figs, version):
    """Section 2: the training curves, read against the loss that made them; every verdict computed."""
    it0, out = its[0], []
    idle = warmup_steps(it0["log"])
    start = ("Both log-ratios are exactly 0 at step 1: the policy is its own reference before the first update, "
             "so the first loss is the mean squared target. " + (
                 f"They stay at 0 through step {idle + 1}: the learning-rate warm-up gives "
                 f"{'step 1' if idle == 1 else f'steps 1-{idle}'} a learning rate of 0 (Hugging Face's linear warm-up starts from "
                 "0, and the released recipe uses it), so no weight moves until then (shaded). "
                 if idle else ""))
    if it0["loss"] == "sppo":
        ends = [(it, versus(it["log"][-1]["log_ratio_pos"], it["target_pos"]),
                 versus(it["log"][-1]["log_ratio_neg"], it["target_neg"])) for it in its]
        count = lambda k, word: sum(e[k] == word for e in ends)  # noqa: E731
        out += ["Top: the SPPO loss, the mean of (log pi(y|x) - log pi_t(y|x) - eta (W - 1/2))^2 over the "
                "trained responses. Bottom: the mean log-ratio log pi(y|x) - log pi_t(y|x) of those with W > 1/2 "
                "(winners, blue) and W < 1/2 (losers, red), and dashed, the mean target eta (W - 1/2) of each "
                "group. " + start + "The squared loss pulls each response's log-ratio towards its own target "
                "from either side (its gradient changes sign there), where DPO's loss keeps rewarding a loser "
                "pushed further down. A group's mean can still end short of its target or past it: the "
                "responses share one set of weights, the optimizer carries momentum, and the run stops after a "
                "fixed number of steps.", "",
                "Where the last step left them: " + "; ".join(
                    f"iteration {it['t']}: winners {it['log'][-1]['log_ratio_pos']:+.2f} against "
                    f"{it['target_pos']:+.2f} ({pos}), losers {it['log'][-1]['log_ratio_neg']:+.2f} against "
                    f"{it['target_neg']:+.2f} ({neg})" for it, pos, neg in ends) + ". "
                f"Over the {len(its)} iterations the winners end past their target in {count(1, 'past it')}, at it "
                f"(within 10%) in {count(1, 'at it')} and short of it in {count(1, 'short of it')}; the losers past "
                f"it in {count(2, 'past it')}, at it in {count(2, 'at it')} and short of it in "
                f"{count(2, 'short of it')}.", ""]
    else:
        out += [f"Top: the {it0['loss'].upper()} loss over the best/worst pairs. Bottom: the mean log-ratio "
                "log pi(y|x) - log pi_t(y|x) of the winners (blue) and losers (red). " + start + "The pair "
                "losses only see the difference of the two; nothing anchors either one.", ""]
    return out


def section_W(run, its, ev, figs, version):
    """Section 3: the judge's view of the policy's own samples (W): spread, targets, and what is trained."""
    it0 = its[0]
    all_trained = all(len(it["W_trained"]) == len(it["W"]) for it in its)
    return ["## 3. How the judge sees the policy's own samples", "",
            f"![distribution of W]({figs['W']})", "",
            "Each iteration samples K responses per training prompt from the current policy, and the judge "
            "scores every pair: W is a response's mean win probability against its K siblings (its own 1/2 "
            "included), so W averages exactly 1/2 on every prompt and only its spread carries information. A "
            "prompt whose samples are all alike to the judge gives every one W = 1/2 and SPPO nothing to learn "
            "(every target eta (W - 1/2) is 0). The filled bars are all the samples; the outline, the ones "
            + ("trained, which here are all of them (--select all). " if all_trained else
               "trained: the best and the worst by W of each prompt (--select best-worst, the released code's), "
               "so they sit at the two ends of each prompt's range of W. ")
            + (f"With K = {it0['k']} and a decisive judge (world v1), a prompt with one bad sample among good ones "
               f"gives the good ones W near {(0.5 * (it0['k'] - 1) + 1) / it0['k']:.1f} and the bad one W near "
               f"{0.5 / it0['k']:.1f}. " if version == 1 else
               "World v2's judge is soft (a small difference in quality wins only a little more often than not), "
               "so W stays well inside 0-1. ")
            + f"What to see: the spread of W (standard deviation) {moves([it['W'].std() for it in its], 'widens', 'narrows')}"
            f" over iterations {', '.join(str(it['t']) for it in its)}; the share of all-alike prompts (W spread "
            f"under 0.1) {moves([100 * it['alike'] for it in its], 'grows', 'shrinks', '{:.0f}%')}; and the "
            f"mean size of the trained targets |eta (W - 1/2)|, how far each iteration asks the policy to move, "
            f"{moves([it['target_size'] for it in its], 'grows', 'shrinks')}. All samples alike on every prompt "
            "is what the Nash equilibrium looks like from inside: no response of the policy is preferred to "
            "another, and SPPO's updates stop.", ""]


def length_push(gap, tol=2):
    """What the trained-up minus trained-down lengths (characters, one per iteration) say, in words."""
    if all(abs(g) < tol for g in gap):
        return f"the judge's choices push the length neither way (within {tol} characters)"
    if all(g >= tol for g in gap) or all(g <= -tol for g in gap):
        return f"the judge's choices favour {'longer' if gap[0] > 0 else 'shorter'} answers in every iteration"
    return "the direction changes from iteration to iteration"


def section_length(run, its, ev, figs, version):
    """Section 4: length, of the held-out answers and of what the judge's choices train up and down."""
    names, m = list(ev["models"]), ev["models"]
    gap = [it["length_pos"] - it["length_neg"] for it in its]
    return ["## 4. Length", "",
            f"![mean length]({figs['length']})", "",
            f"Black: the mean length in characters of the held-out answers ({ev['decoding']}). Blue and red: in "
            "the samples each iteration trains on (drawn from the policy it starts from), the mean length of the "
            "responses trained up (W > 1/2) and down (W < 1/2): what the judge's choices push the length towards. "
            f"What to see: the held-out answers' length {moves([m[n]['mean_length'] for n in names], 'grows', 'shrinks', '{:.0f}')}"
            f" characters; the responses trained up are {', '.join(f'{g:+.0f}' for g in gap)} characters longer than "
            f"those trained down in iterations {', '.join(str(it['t']) for it in its)}: {length_push(gap)}. A sign-off adds 17 "
            "characters and a filler 4, so here a better answer can be longer or shorter; real judges (PairRM, "
            "GPT-4) favour longer answers, which is why AlpacaEval reports LC"
            + (" and why the v2 judge has a mild length bias: a policy can then gain raw win rate by writing "
               "longer, which LC discounts and the hidden score does not reward." if version == 2 else "."), "",
            "Per iteration, all the sampled training responses: "
            + "; ".join(f"iteration {it['t']}: mean length {it['length']:.0f}, hidden score {it['rule']:+.2f}"
                        for it in its) + ".", ""]


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
    for n in names:
        ev["models"][n]["share_won"] = share_won(run, ev, n)
    figs = {"winrate": fig_winrate(run, ev, names, best), "training": fig_training(run, its), "W": fig_W(run, its),
            "length": fig_length(run, its, ev, names)}

    sections = (section_winrate, section_training, section_W, section_length)
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
    seeds = sorted({run_setting(run, "SEED") for _, run in runs})
    lines += ["", "![compare](compare.png)", "",
              "What this run shows: " + leaders(evals) + " " + hacks(evals), "",
              f"This is one run of each method: seed {', '.join(seeds)} (the loop's SEED), this page made on "
              f"{machine()}. The seed decides every iteration's samples, and so does the machine, through its "
              "floating-point rounding: at temperature 0.7 one flipped token changes a response and what is trained "
              "on it, and iterations compound it. A sentence above holds for this run; how often it holds over "
              "other seeds and machines needs those runs (`SEED=1 make compare TINY=runs/tiny-seed1`; what was "
              "measured so far, and how often each finding held: docs/tiny-world-compare-claims.md). Read it "
              "against the paper (Wu et al., ICLR 2025: on AlpacaEval 2.0 with Mistral-7B-Instruct, SPPO's LC win rate "
              "rises every iteration, 17.1 to 28.5%, and ends ahead of iterative DPO and IPO trained on the same "
              "data). Here the judge is a small ranker that knows one rule and the policy a toy: a tiny world can "
              "show how each loss moves the policy, not AlpacaEval's numbers.", ""]
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return os.path.join(out, "compare.md")


def run_setting(run, name):
    """A setting of the loop, as run_loop.sh recorded it in RUN/settings.txt ('?' when absent)."""
    with open(os.path.join(run, "settings.txt")) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line).get(name, "?")


def machine():
    """The CPU this runs on, in words ('Intel Xeon ..., 2 CPUs'), from /proc/cpuinfo where Linux has it."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} CPUs"


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
