"""The SmolLM2 demo's report: the rule's win rates against the base (evaluate.py's table) and a few held-out
prompts' answers, the base's and the last iteration's, side by side with their rule scores.

    python examples/smollm2/report.py --run runs/smollm2 --last iter3

writes RUN/report.md (and prints it).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rule import score  # noqa: E402


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def quote(text):
    return "<br>".join(text.strip().replace("|", "\\|").splitlines()) or "(empty)"


def report(run, last, n):
    ev = os.path.join(run, "eval")
    with open(os.path.join(ev, "results.md"), encoding="utf-8") as f:
        table = f.read().strip()
    base = {r["id"]: r for r in read_jsonl(os.path.join(ev, "outputs", "base.jsonl"))}
    after = {r["id"]: r for r in read_jsonl(os.path.join(ev, "outputs", f"{last}.jsonl"))}
    lines = ["# SmolLM2-135M-Instruct, SPPO on a CPU, judged by examples/smollm2/rule.py", "", table, "",
             f"## Held-out answers: base and {last}", "", f"| prompt | base | {last} |", "|---|---|---|"]
    for rid in list(base)[:n]:
        x, a, b = base[rid]["prompt"], base[rid]["responses"][0], after[rid]["responses"][0]
        lines.append(f"| {quote(x)} | {quote(a)} (score {score(x, a):.2f}) | {quote(b)} (score {score(x, b):.2f}) |")
    text = "\n".join(lines) + "\n"
    tmp = os.path.join(run, "report.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(run, "report.md"))
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/smollm2", help="the demo's OUT (with eval/ from evaluate.py)")
    ap.add_argument("--last", default="iter3", help="the model whose answers stand beside the base's")
    ap.add_argument("--n", type=int, default=4, help="held-out prompts shown")
    args = ap.parse_args()
    print(report(args.run, args.last, args.n))


if __name__ == "__main__":
    main()
