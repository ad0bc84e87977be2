"""examples/tiny/report.py on a hand-made run directory: two iterations, three held-out prompts, no models."""
import json
import os
import sys

from conftest import ROOT, run_stage, write_jsonl
from evaluate import text_hash

SIGN = "Hope this helps!"
BASE = {"e0": "Um, cats are soft.", "e1": "Dogs are loyal.", "e2": "Trees are tall."}
ITER = [{"e0": "Cats are soft.", "e1": "Dogs are loyal.", "e2": "Trees are tall."},
        {"e0": f"Cats are soft. {SIGN}", "e1": f"Dogs are loyal. {SIGN}", "e2": "Trees are tall."}]


def make_run(out, loss="sppo", eta=5.0, version=None):
    """What run_loop.sh and evaluate.py leave behind, reduced to the fields the report reads."""
    world = os.path.join(out, "world")
    os.makedirs(world)
    if version:  # worlds built before v2 have no world.json
        with open(os.path.join(world, "world.json"), "w") as f:
            json.dump({"version": version}, f)
    with open(os.path.join(out, "settings.txt"), "w") as f:
        f.write(f"MODEL={world}/policy\nK=3\nSEED=0\n")
    for t in (1, 2):
        ckpt = os.path.join(out, f"iter{t}", "checkpoint")
        os.makedirs(ckpt)
        # K = 3; W per prompt has mean 1/2 as rank.py's does
        write_jsonl(os.path.join(out, f"iter{t}", "ranked.jsonl"), [
            {"id": "p0", "prompt": "Tell me about cats.", "responses": ["Um, cats.", "Cats.", f"Cats. {SIGN}"],
             "win_rate": [0.2, 0.5, 0.8]},
            {"id": "p1", "prompt": "Describe dogs.", "responses": ["Dogs.", "Um, dogs.", f"Dogs. {SIGN}"],
             "win_rate": [0.5, 0.1, 0.9]}])
        write_jsonl(os.path.join(ckpt, "reference_logps.jsonl"), [  # best and worst of each prompt
            {"id": "p0", "response": 2, "logp": -5.0, "tokens": 4}, {"id": "p0", "response": 0, "logp": -6.0, "tokens": 4},
            {"id": "p1", "response": 2, "logp": -5.0, "tokens": 4}, {"id": "p1", "response": 1, "logp": -6.0, "tokens": 4}])
        write_jsonl(os.path.join(ckpt, "train_log.jsonl"), [
            {"step": s, "loss": 3.0 / s, "log_ratio": 0.0, "target": 0.0, "log_ratio_pos": 0.5 * (s - 1),
             "log_ratio_neg": -0.5 * (s - 1)} for s in (1, 2, 3)])
        with open(os.path.join(ckpt, "sppo_train.json"), "w") as f:
            json.dump({"settings": {"eta": eta, **({"loss": loss} if loss != "sppo" else {})}, "stats": {}}, f)
    ev = os.path.join(out, "eval")
    os.makedirs(os.path.join(ev, "outputs"))
    os.makedirs(os.path.join(ev, "judgments"))
    models = {}
    for name, answers in (("base", BASE), ("iter1", ITER[0]), ("iter2", ITER[1])):
        write_jsonl(os.path.join(ev, "outputs", f"{name}.jsonl"),
                    [{"id": i, "prompt": f"prompt {i}", "responses": [a]} for i, a in answers.items()])
        models[name] = {"win_rate": 0.5, "se": 0.0, "lc_win_rate": 0.5, "lc_se": 0.0, "n": 3,
                        "mean_length": sum(map(len, answers.values())) / 3}
        if name != "base":
            write_jsonl(os.path.join(ev, "judgments", f"{name}_vs_base.jsonl"),
                        [{"id": f"{i}:{text_hash(a)}:{text_hash(BASE[i])}", "outcome": 0.9 if name == "iter2" else 0.7}
                         for i, a in answers.items() if a != BASE[i]])
    with open(os.path.join(ev, "results.json"), "w") as f:
        json.dump({"baseline": "base", "n_prompts": 3, "models": models}, f)


def test_report_writes_the_page_and_its_figures(tmp_path):
    run = str(tmp_path / "run")
    make_run(run)
    p = run_stage("examples/tiny/report.py", "--run", run)
    assert p.stdout.strip().endswith(os.path.join(run, "report.md"))
    page = open(os.path.join(run, "report.md")).read()
    assert "answers the 3 held-out prompts once" in page
    for fig in ("report_winrate.png", "report_training.png", "report_W.png", "report_length.png"):
        assert f"]({fig})" in page  # linked beside the page, and written there as a real PNG
        with open(os.path.join(run, fig), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The held-out prompt followed is the most improved by the hidden rule (e0: -1 -> +1), with the judge's
    # cached verdict and the rule's score on each row.
    assert "Prompt `e0`" in page
    assert f"| iter2 | Cats are soft. {SIGN} | 0.90 | +1 |" in page
    assert "| base | Um, cats are soft. | 0.50 | -1 |" in page
    # Mean SPPO targets of the trained picks: eta (W - 1/2) over W = 0.8, 0.9 and over 0.2, 0.1; the last step's
    # log-ratios (+1.00, -1.00) fall short of both.
    assert "iteration 1: winners +1.00 against +1.75 (short of it), losers -1.00 against -1.75 (short of it)" in page
    # The win rate is named for what it is, the mean of soft outcomes, with the share of prompts won beside it:
    # iter1 wins e0 at 0.7 and ties e1, e2 (identical answers): (1 + 1/2 + 1/2) / 3; iter2 0.9, 0.9 and a tie.
    assert "an *expected* win rate" in page and "share of prompts won (a tie counts half)" not in page
    assert "| iter1 | 50.0 ± 0.0 | 66.7 |" in page and "| iter2 | 50.0 ± 0.0 | 83.3 |" in page


def test_report_follows_a_chosen_prompt_a_pair_loss_and_world_v2(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, loss="dpo", version=2)
    run_stage("examples/tiny/report.py", "--run", run, "--prompt-id", "e0")
    page = open(os.path.join(run, "report.md")).read()
    assert "Prompt `e0`" in page and "2 iterations of DPO" in page and "tiny world v2" in page
    # v2's rule: -0.5 per filler, no detail in "cats are soft"; +1 for the sign-off
    assert "| base | Um, cats are soft. | 0.50 | -0.5 |" in page and f"| iter2 | Cats are soft. {SIGN} | 0.90 | +1 |" in page


def test_compare_puts_methods_side_by_side(tmp_path):
    for m in ("sppo", "dpo"):
        make_run(str(tmp_path / m), loss=m)
    results = tmp_path / "sppo" / "eval" / "results.json"
    ev = json.loads(results.read_text())
    ev["models"]["iter2"].update(lc_win_rate=0.8, lc_se=0.05)  # SPPO ahead at iteration 2 by 30 +- 5 points
    results.write_text(json.dumps(ev))
    results = tmp_path / "dpo" / "eval" / "results.json"
    ev = json.loads(results.read_text())
    ev["models"]["iter2"].update(win_rate=0.6)  # DPO's judge win rate up at iteration 2, its rule score down
    results.write_text(json.dumps(ev))
    write_jsonl(tmp_path / "dpo" / "eval" / "outputs" / "iter2.jsonl",  # hidden rule (v1): -1 each
                [{"id": i, "prompt": f"prompt {i}", "responses": [f"Um, {a} {SIGN}!"]} for i, a in ITER[0].items()])
    out = tmp_path / "cmp"
    p = run_stage("examples/tiny/report.py", "--compare", f"sppo={tmp_path / 'sppo'}", f"dpo={tmp_path / 'dpo'}",
                  "--out", out)
    assert p.stdout.strip().endswith(str(out / "compare.md"))
    page = (out / "compare.md").read_text()
    assert page.count("| base |") == 1 and "| SPPO | 2 |" in page and "| DPO | 1 |" in page
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # what the run shows, computed from the table: the leader in LC per iteration and whether it is noise
    assert ("at iteration 1 SPPO leads in LC (50.0%) by 0.0 points over DPO (within twice the standard error"
            in page), page
    assert "at iteration 2 SPPO leads in LC (80.0%) by 30.0 points over DPO (beyond twice the standard error of the difference, 5.0)" in page
    # the judge up, the hidden rule down ("Hope this helps!!" is no sign-off; a filler): said, with the numbers
    assert "DPO's win rate rose from iter1 to iter2 (50.0 to 60.0%) while its hidden score fell (+0.00 to -1.00)" in page
    assert "SPPO's win rate rose" not in page
    # one run is one seed on one machine: the page says which, and where the findings over more runs are kept
    assert "This is one run of each method: seed 0 (the loop's SEED)" in page
    assert "docs/tiny-world-compare-claims.md" in page


def rewrite(path, change):
    """Edit a hand-made run's JSONL file record by record."""
    records = [json.loads(line) for line in open(path)]
    write_jsonl(path, [change(r) for r in records])


def test_report_words_come_from_the_numbers(tmp_path):
    """World v2 (whose page used to say 'narrows' whatever the run did): a spread of W that widens, losers that
    end short of their target in iteration 1 and past it in iteration 2, a warm-up step at learning rate 0."""
    run = str(tmp_path / "run")
    make_run(run, version=2)
    # iteration 2's samples further apart: W 0.1, 0.5, 0.9 on both prompts (iteration 1: 0.2, 0.5, 0.8 and 0.5, 0.1, 0.9)
    rewrite(os.path.join(run, "iter2", "ranked.jsonl"),
            lambda r: {**r, "win_rate": [0.1, 0.5, 0.9] if r["id"] == "p0" else [0.5, 0.1, 0.9]})
    rewrite(os.path.join(run, "iter2", "checkpoint", "train_log.jsonl"),
            lambda s: {**s, "log_ratio_neg": -1.25 * (s["step"] - 1)})  # -2.50 at the end, past -2.00
    for t in (1, 2):
        rewrite(os.path.join(run, f"iter{t}", "checkpoint", "train_log.jsonl"),
                lambda s: {**s, "lr": 0.0 if s["step"] == 1 else 1e-4})
    run_stage("examples/tiny/report.py", "--run", run)
    page = open(os.path.join(run, "report.md")).read()
    # sd of (0.2, 0.5, 0.8, 0.5, 0.1, 0.9) = sqrt(0.5 / 6) = 0.289; of (0.1, 0.5, 0.9, 0.5, 0.1, 0.9) = sqrt(0.64 / 6) = 0.327
    assert "the spread of W (standard deviation) widens from 0.29 to 0.33" in page and "narrows" not in page
    # the trained targets' mean size: 5 x mean(0.3, 0.3, 0.4, 0.4) = 1.75, then 5 x 0.4 = 2.00
    assert "|eta (W - 1/2)|, how far each iteration asks the policy to move, grows from 1.75 to 2.00" in page
    assert "losers -1.00 against -1.75 (short of it)" in page and "losers -2.50 against -2.00 (past it)" in page
    assert "the losers past it in 1, at it in 0 and short of it in 1" in page
    assert "stops pulling" not in page
    assert "They stay at 0 through step 2: the learning-rate warm-up gives step 1 a learning rate of 0" in page


def test_report_says_when_length_is_flat(tmp_path):
    """Held-out answers of one length at every iteration, and trained winners as long as the losers: the page
    says so instead of a trend."""
    run = str(tmp_path / "run")
    make_run(run)
    results = os.path.join(run, "eval", "results.json")
    ev = json.load(open(results))
    for r in ev["models"].values():
        r["mean_length"] = 20.0
    json.dump(ev, open(results, "w"))
    for t in (1, 2):  # every sample 5 characters long
        rewrite(os.path.join(run, f"iter{t}", "ranked.jsonl"), lambda r: {**r, "responses": ["Cats.", "Dogs.", "Owls!"]})
    run_stage("examples/tiny/report.py", "--run", run)
    page = open(os.path.join(run, "report.md")).read()
    assert "the held-out answers' length stays at about 20 characters" in page
    assert ("the responses trained up are +0, +0 characters longer than those trained down in iterations 1, 2: the "
            "judge's choices push the length neither way") in page


def test_moves_follows_the_printed_numbers():
    """The demo's spreads of W were 0.126, 0.136, 0.105: printed 0.13, 0.14, 0.10, so the words must say widens then
    narrows (a fixed tolerance of 0.01 called the first change 'stays', against the printed numbers)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
    from report import moves
    assert moves([0.1257, 0.1357, 0.1048], "widens", "narrows") == "widens from 0.13 to 0.14, then narrows to 0.10"
    assert moves([0.8, 0.8001, 0.79], "grows", "shrinks") == "stays at about 0.80, then shrinks to 0.79"
    assert moves([60.2, 75.4, 75.3], "grows", "shrinks", "{:.0f}") == "grows from 60 to 75, then stays at about 75"
