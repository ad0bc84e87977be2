"""PairRM in fp16 and bf16 against fp32: how far the logits M, the head-to-head probabilities P, the win rates W
and the best / worst choice move, at PairRM's real shape (DeBERTa-v3-large: hidden 1024, 24 layers, 16 heads,
MLP 4096, vocabulary 128,005; random weights), on realistic pair lengths.

    python bench/bench_pairrm_precision.py --out bench/results/pairrm_precision_cpu.json    # ~50 min, 1 thread

Why: the released SPPO code runs PairRM in fp16 on CUDA (llm-blender's Blender.loadranker calls .half());
rank.py's CUDA default was bf16 (now fp16, pairrm.default_dtype, by this measurement: BENCHMARKS.md). bf16
keeps 8 bits of mantissa, fp16 11 (and a range to 65,504), so at the same speed on a GPU fp16 is the more exact
one unless something overflows. This measures both.

How: the random ranker is bench_rank.random_ranker's. Random weights need care to behave like trained ones: with
DeBERTa's own 0.02 every token ends in nearly the same state and M ~ 0 (measured: |M| ~ 0.15, the same for every
pair), and a deep random post-LN stack collapses the tokens at any larger scale too (24 layers at 0.04-0.2: |M|
< 0.1). The defaults here: weights of std 0.06 (attention scores of std ~2), each layer's output projections
scaled by 0.1 (each layer adds to a token's state: final states of different tokens at cosine ~0.9, not ~1) and
the head's last layer by 10, so that M has a spread of a few units (a trained PairRM's logits on real answers
are of that order). The attention-score spread and M's spread are printed and saved with the numbers. Random
weights have no trained outlier features: the error measured is rounding, not the overflow risk of PairRM's own
weights. Each precision loads the saved weights as rank.py does (pairrm.load_ranker(dtype=...): weights rounded to
fp16 / bf16) and scores every ordered pair with pairrm.pair_logits. M, then P (rank.pairwise_probs, rank.py's
default) and W (rank.win_rates) are compared with fp32's, and the best / worst response (argmax / argmin of W;
also of the released code's Bradley-Terry scores s = rank.bt_scores(M)) with fp32's choice.

On a CPU without native fp16 / bf16 matrix units (AVX-512 only: no AMX, no AVX512-FP16 / -BF16), torch's fp16
and bf16 matrix products run 8-25x slower than fp32 (a 512x1024x4096 linear: fp32 78, bf16 10, fp16 3 GFLOP/s, 1
thread), too slow for 24 layers. By default (--no-emulate: not) the matrix products (linear, matmul, mm, addmm,
bmm, baddbmm) therefore run the way a GPU runs them: inputs in fp16 / bf16 (as stored), products summed in fp32,
the result rounded to fp16 / bf16; every other op (softmax, layer norm, GELU, gathers, adds) runs natively in
fp16 / bf16. --native-rows N also runs the N shortest pair rows with torch's own CPU fp16 / bf16 kernels: their
error against fp32 must be of the same size as the emulation's on the same rows (each rounding differs a little
from the other, and 24 layers spread it, so the two do not agree bit for bit).
"""
import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoTokenizer

from benchutil import machine, table, write_json

import pairrm  # noqa: E402  (benchutil puts the repository on the path)
import rank  # noqa: E402
import world  # noqa: E402
from bench_rank import random_ranker  # noqa: E402

LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (under torch.inference_mode, as pairrm.pair_logits runs, composite ops such as linear reach the mode whole)
MATMULS = {torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default,
           torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}


class Fp32Matmuls(TorchDispatchMode):
    """Matrix products of fp16 / bf16 tensors summed in fp32 and rounded once to the inputs' dtype (what
    cuBLAS does with fp32 accumulation); all other ops untouched."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            if len(dtypes) == 1 and dtypes <= set(LOW.values()):
                up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*up, **kwargs).to(dtypes.pop())
        return func(*args, **kwargs)


def make_records(tok, n, k, lo, hi, seed=0):
    """n toy prompts with k responses each, every response cut to a length drawn uniformly from [lo, hi]
    tokens of the ranker's tokenizer (toy answers joined until long enough)."""
    rng = random.Random(seed)
    out = []
    for prompt in world.make_prompts(rng, n):
        responses = []
        for _ in range(k):
            target, text = rng.randint(lo, hi), ""
            while len(tok(text)["input_ids"]) < target:
                text += " " + world.make_answer(rng, prompt)
            responses.append(tok.decode(tok(text.strip())["input_ids"][1:target - 1]).strip())
        out.append((prompt, responses))
    return out


def logits(path, dtype, pairs, batch_size, emulate):
    """pairrm.pair_logits of the (source, candidate1, candidate2) pairs in the given precision, and seconds."""
    model, tok = pairrm.load_ranker(path, "cpu", dtype)
    t0 = time.perf_counter()
    if emulate and dtype in LOW:
        with Fp32Matmuls():
            flat = pairrm.pair_logits(model, tok, pairs, batch_size)
    else:
        flat = pairrm.pair_logits(model, tok, pairs, batch_size)
    return flat, time.perf_counter() - t0


def score(path, dtype, records, cells, batch_size, emulate):
    """KxK logits M of every record in the given precision: [n, K, K] float64 (diagonal 0), and seconds."""
    pairs = [(p, c[i], c[j]) for p, c in records for i, j in cells]
    flat, seconds = logits(path, dtype, pairs, batch_size, emulate)
    M = np.zeros((len(records), len(records[0][1]), len(records[0][1])))
    M[:, [i for i, _ in cells], [j for _, j in cells]] = flat.reshape(len(records), len(cells))
    return M, seconds


def compare(M, ref):
    """Errors of logits M against the fp32 ref: M, P, W, the BT scores, and the best / worst choices."""
    finite = bool(np.isfinite(M).all())
    P, Pr = rank.pairwise_probs(M), rank.pairwise_probs(ref)
    W, Wr = rank.win_rates(P), rank.win_rates(Pr)
    s, sr = rank.bt_scores(M), rank.bt_scores(ref)
    off = ~np.eye(M.shape[-1], dtype=bool)
    dM, dP, dW, ds = (np.abs(a - b) for a, b in ((M[:, off], ref[:, off]), (P[:, off], Pr[:, off]), (W, Wr), (s, sr)))
    n = len(M)
    return {"finite": finite,
            "M_max": float(dM.max()), "M_mean": float(dM.mean()),
            "M_rel": float(dM.mean() / np.abs(ref[:, off]).mean()),
            "P_max": float(dP.max()), "P_mean": float(dP.mean()),
            "W_max": float(dW.max()), "W_mean": float(dW.mean()),
            "s_max": float(ds.max()),
            "best_changed": int((W.argmax(-1) != Wr.argmax(-1)).sum()),
            "worst_changed": int((W.argmin(-1) != Wr.argmin(-1)).sum()),
            "bt_best_changed": int((s.argmax(-1) != sr.argmax(-1)).sum()),
            "bt_worst_changed": int((s.argmin(-1) != sr.argmin(-1)).sum()),
            "prompts": n}


def activity(path, pair):
    """How the random weights behave on one pair row (fp32): the spread of the first layer's attention scores
    (content-to-content part; a trained model's: a few units), the mean cosine between the final states of
    different tokens (~1: every token the same, the collapse that makes M ~ 0) and the largest |output| of any
    linear layer (against fp16's limit, 65,504)."""
    model, tok = pairrm.load_ranker(path, "cpu", "fp32")
    seen, peak = {}, [0.0]
    first = model.pretrained_model.encoder.layer[0].attention.self
    def keep(name):  # the first call only (a hook that returns something replaces the output: return None)
        def hook(module, inputs, output):
            seen.setdefault(name, output)
        return hook

    def track(module, inputs, output):
        peak[0] = max(peak[0], float(output.abs().max()))
    handles = [first.query_proj.register_forward_hook(keep("q")), first.key_proj.register_forward_hook(keep("k"))]
    handles += [m.register_forward_hook(track) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.tensor([pairrm.encode_pairs(tok, [pair])[0]])
    with torch.inference_mode():
        out = model.pretrained_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    for h in handles:
        h.remove()
    heads = model.config.num_attention_heads
    q, k = (seen[x][0].view(ids.shape[1], heads, -1).transpose(0, 1) for x in "qk")
    scores = q @ k.transpose(1, 2) / np.sqrt(q.shape[-1] * 3)  # DeBERTa's scale: c2c + c2p + p2c
    unit = torch.nn.functional.normalize(out, dim=-1)
    n = len(unit)
    cosine = float(((unit @ unit.T).sum() - n) / (n * (n - 1)))
    del model
    return {"attention_score_std": float(scores.std()), "token_cosine": cosine, "max_abs_linear_output": peak[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--min-tokens", type=int, default=50, help="responses: at least this many tokens")
    ap.add_argument("--max-tokens", type=int, default=400, help="responses: at most this many tokens")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than PairRM's 24 (a quick check)")
    ap.add_argument("--init", type=float, default=0.06, help="the random weights' standard deviation")
    ap.add_argument("--branch-gain", type=float, default=0.1, help="scale of each layer's output projections")
    ap.add_argument("--head-gain", type=float, default=10.0, help="scale of the head's last layer (of M)")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--no-emulate", dest="emulate", action="store_false",
                    help="torch's own CPU fp16 / bf16 kernels for every prompt (slow on CPUs without AMX)")
    ap.add_argument("--native-rows", type=int, default=2, help="also run this many (the shortest) pair rows "
                    "with torch's own CPU kernels")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/pairrm_precision_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    rng = random.Random(args.seed + 1)
    corpus = [t for p in world.make_prompts(rng, 300) for t in (p, world.make_answer(rng, p))]
    tmp = tempfile.TemporaryDirectory()
    path = os.path.join(tmp.name, "pairrm")
    n_params = random_ranker(path, "pairrm", corpus, seed=args.seed, layers=args.layers, initializer_range=args.init,
                             branch_gain=args.branch_gain, head_gain=args.head_gain)
    tok = AutoTokenizer.from_pretrained(path)
    records = make_records(tok, args.n_prompts, args.k, args.min_tokens, args.max_tokens, args.seed)
    cells = rank.ordered_pairs(args.k)
    pairs = [(p, c[i], c[j]) for p, c in records for i, j in cells]
    rows = pairrm.encode_pairs(tok, pairs)
    lengths = [len(r) for r in rows]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    print(f"PairRM shape: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
          f"{config['num_attention_heads']} heads, MLP {config['intermediate_size']}, vocabulary {config['vocab_size']}: "
          f"{n_params / 1e6:.0f}M parameters, random (std {args.init}); {len(records)} prompts x K={args.k} = "
          f"{len(rows)} pair rows of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    act = activity(path, pairs[0])
    print(f"random weights (fp32, one row): attention score std {act['attention_score_std']:.2f}, cosine between "
          f"final token states {act['token_cosine']:.2f}, largest |linear output| {act['max_abs_linear_output']:.1f}",
          flush=True)

    ref, t_ref = score(path, "fp32", records, cells, args.batch_size, False)
    off = ~np.eye(args.k, dtype=bool)
    print(f"fp32: {t_ref:.0f}s; |M| mean {np.abs(ref[:, off]).mean():.2f}, max {np.abs(ref[:, off]).max():.2f}, "
          f"std {ref[:, off].std():.2f}; "
          f"W range {rank.win_rates(rank.pairwise_probs(ref)).min():.3f}-{rank.win_rates(rank.pairwise_probs(ref)).max():.3f}",
          flush=True)
    results, native_check = [], []
    short = sorted(range(len(rows)), key=lambda i: lengths[i])[: args.native_rows]

    def flat_of(M):
        return M[:, [i for i, _ in cells], [j for _, j in cells]].reshape(-1)
    flat_ref = flat_of(ref)
    low = {}
    for name in args.dtypes.split(","):
        low[name], t = score(path, name, records, cells, args.batch_size, args.emulate)
        r = {"dtype": name, "kernels": "fp32-summed matmuls" if args.emulate else "torch CPU", "seconds": t,
             **compare(low[name], ref)}
        results.append(r)
        print(f"{name}: {t:.0f}s", json.dumps({k: v for k, v in r.items() if k not in ("dtype",)}), flush=True)
    for name in low if args.emulate and args.native_rows else ():  # last: the slow part
        flat_native, tn = logits(path, name, [pairs[i] for i in short], args.batch_size, False)
        emulated = flat_of(low[name])[short]
        native_check.append({"dtype": name, "rows": len(short), "row_tokens": [lengths[i] for i in short],
                             "seconds": tn, "native_M_max": float(np.abs(flat_native - flat_ref[short]).max()),
                             "native_M_mean": float(np.abs(flat_native - flat_ref[short]).mean()),
                             "emulated_M_max": float(np.abs(emulated - flat_ref[short]).max()),
                             "emulated_M_mean": float(np.abs(emulated - flat_ref[short]).mean()),
                             "native_vs_emulated_M_max": float(np.abs(flat_native - emulated).max())})
        print(f"{name} with torch's CPU kernels on the {len(short)} shortest rows ({tn:.0f}s):",
              json.dumps(native_check[-1]), flush=True)

    print()
    table(results, [("dtype", "dtype", "{}"), ("kernels", "matmuls", "{}"),
                    ("M_max", "M max err", "{:.2e}"), ("M_mean", "M mean err", "{:.2e}"), ("M_rel", "mean/|M|", "{:.1e}"),
                    ("P_max", "P max err", "{:.2e}"), ("P_mean", "P mean err", "{:.2e}"),
                    ("W_max", "W max err", "{:.2e}"), ("W_mean", "W mean err", "{:.2e}"),
                    ("best_changed", "best changed", "{}"), ("worst_changed", "worst changed", "{}"),
                    ("bt_best_changed", "BT best", "{}"), ("bt_worst_changed", "BT worst", "{}")])
    Wr = rank.win_rates(rank.pairwise_probs(ref))
    Ws = np.sort(Wr, axis=-1)
    Ss = np.sort(rank.bt_scores(ref), axis=-1)
    gaps = {"best_gap_min": float((Ws[:, -1] - Ws[:, -2]).min()), "worst_gap_min": float((Ws[:, 1] - Ws[:, 0]).min()),
            "bt_best_gap_min": float((Ss[:, -1] - Ss[:, -2]).min()), "bt_worst_gap_min": float((Ss[:, 1] - Ss[:, 0]).min())}
    print(f"fp32 margins (how close the closest choice is): W best - second {gaps['best_gap_min']:.2e}, second "
          f"worst - worst {gaps['worst_gap_min']:.2e}; BT scores {gaps['bt_best_gap_min']:.2e}, "
          f"{gaps['bt_worst_gap_min']:.2e}; {time.time() - t_start:.0f}s in all")
    write_json(args.out, {
        "benchmark": "pairrm_precision", "command": "python bench/bench_pairrm_precision.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False, True))
        + ("" if args.emulate else " --no-emulate"),
        "machine": machine(), "parameters": n_params, "config": {k: config[k] for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")},
        "init": args.init, "branch_gain": args.branch_gain, "head_gain": args.head_gain, "prompts": len(records),
        "k": args.k, "row_tokens": {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))},
        "random_weights": act, "fp32_seconds": t_ref,
        "fp32_abs_M": {"mean": float(np.abs(ref[:, off]).mean()), "max": float(np.abs(ref[:, off]).max()),
                       "std": float(ref[:, off].std())},
        "fp32_margins": gaps, "results": results, "native_check": native_check, "fp32_logits": ref.tolist()})


if __name__ == "__main__":
    main()
