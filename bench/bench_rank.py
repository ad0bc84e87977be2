"""Ranking throughput: rank.py against llm-blender's Blender.rank(..., return_scores=True), the call the released
SPPO code makes (batch_size=1), on the same prompts x K responses and the same PairRM-shaped ranker.

    python bench/bench_rank.py --ranker runs/tiny/world/ranker --out bench/results/rank_tiny.json
    python bench/bench_rank.py --ranker medium --out bench/results/rank_medium.json     # random, ~10M parameters
    python bench/bench_rank.py --ranker pairrm --device cuda --out ...                  # random, PairRM's real shape

--ranker is a ranker directory (as examples/tiny/build.py writes it) or a size (medium, pairrm): a randomly
initialised PairRM-shaped model built in a temporary directory, with a tokenizer trained here, that both
loaders read. The texts are the tiny world's toy answers, 1 to 24 sentences long (about 10 to 250 tokens),
or --data: a generate.py output. First the scores are checked to agree (the Bradley-Terry score that
Blender returns, s_i = mean_j (M_ij - M_ji), fp32 on both sides); then a batch-size sweep on a quarter of the
prompts picks Blender's best batch size; then every method runs --repeats times, round-robin, and the table
gives the median. Blender's batch_size counts prompts (each forward holds one (i, j) cell for that many
prompts); rank.py's counts pair rows (length-sorted across all prompts).
"""
import argparse
import json
import os
import random
import tempfile

import numpy as np
import torch

from benchutil import LiveResults, import_llm_blender, interleaved, machine, median, table

import pairrm  # noqa: E402  (benchutil puts the repository on the path)
import rank  # noqa: E402
import world  # noqa: E402

# DeBERTa-v2 backbones. pairrm: microsoft/deberta-v3-large, PairRM's backbone (hidden 1024, 24 layers, 435M
# parameters with its 128k vocabulary).
SIZES = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
         "medium": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536),
         "pairrm": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=128005)}


def synthetic_records(n, k, seed=0, max_answers=8):
    """n toy prompts, k answers each: 1 to max_answers of the tiny world's answers (1-3 sentences) joined."""
    rng = random.Random(seed)
    return [(p, [" ".join(world.make_answer(rng, p) for _ in range(rng.randint(1, max_answers))) for _ in range(k)])
            for p in world.make_prompts(rng, n)]


def random_ranker(out, size, texts, seed=0, layers=None, initializer_range=0.2, branch_gain=1.0, head_gain=1.0):
    """A randomly initialised PairRM (DebertaV2PairRM) of the given size, saved in examples/tiny/ranker.py's
    layout so that pairrm.load_ranker(out) and llm-blender's Blender().loadranker(out) both load it.
    A size with a vocab_size (pairrm: 128,005) gets a tokenizer of exactly that many tokens (the toy text's
    pieces, then unused ones): Blender rebuilds the backbone with len(tokenizer) embedding rows before it
    loads the weights. layers: this many layers instead of the size's (a CPU check's memory and time).
    initializer_range: the weights' standard deviation (0.02, what DeBERTa is trained from, gives M ~ 0).
    branch_gain: scales every layer's attention-output and MLP-output projection: with 24 random post-LN
    layers at full gain every token ends in nearly the same state (M ~ 0 again); at 0.1 each layer adds to
    the token's state instead of replacing it, as in a trained model. head_gain: scales M."""
    from ranker import build_tokenizer
    from transformers import DebertaV2Config
    tok = build_tokenizer(texts, vocab_size=400, total_size=SIZES[size].get("vocab_size"))
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("source_prefix_id", pairrm.SOURCE_PREFIX), ("cand1_prefix_id", pairrm.CAND1_PREFIX),
        ("cand2_prefix_id", pairrm.CAND2_PREFIX), ("cand_prefix_id", pairrm.CAND_PREFIX))}
    shape = {**SIZES[size], "vocab_size": len(tok), **({"num_hidden_layers": layers} if layers else {})}
    config = DebertaV2Config(  # deberta-v3-large's settings, but the sizes
        **shape, max_position_embeddings=512, type_vocab_size=0, relative_attention=True, max_relative_positions=-1,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, layer_norm_eps=1e-7, pad_token_id=tok.pad_token_id,
        initializer_range=initializer_range,  # not 0.02: the marker states must depend on the text, M not ~0
        n_tasks=1, drop_out=0.05, sep_token_id=tok.sep_token_id, **ids)
    torch.manual_seed(seed)
    model = pairrm.pairrm_class()(config).eval()
    with torch.no_grad():  # a head of unit gain, so that M is of order 1 (a trained PairRM's is) and errors show
        for layer in model.head_layer:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)
        model.head_layer[-1].weight.mul_(head_gain)
        # <|candidate2|> gets <|candidate1|>'s embedding: M then comes from the texts and their order, not from
        # two random marker vectors (which alone gave M ~ 9 for every pair at head_gain 10)
        emb = model.pretrained_model.embeddings.word_embeddings.weight
        emb[ids["cand2_prefix_id"]] = emb[ids["cand1_prefix_id"]]
        for block in model.pretrained_model.encoder.layer:
            block.attention.output.dense.weight.mul_(branch_gain)
            block.output.dense.weight.mul_(branch_gain)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.pretrained_model.save_pretrained(os.path.join(out, "backbone"))
    tok.save_pretrained(os.path.join(out, "backbone"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(ranker_type="pairranker", model_name=os.path.abspath(os.path.join(out, "backbone")),
               source_maxlength=1224, candidate_maxlength=412, inference_mode="full", fp16=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranker", default="runs/tiny/world/ranker", help="a ranker directory, or tiny / medium / pairrm (random)")
    ap.add_argument("--data", default=None, help="generate.py output JSONL (default: synthetic toy answers)")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-answers", type=int, default=8, help="synthetic responses: up to this many toy answers")
    ap.add_argument("--layers", type=int, default=None, help="random ranker: this many layers instead of its "
                    "size's (a CPU check at the real width and vocabulary with less memory and time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="rank.py's rows per forward (default: rank.py's)")
    ap.add_argument("--sweep", default="1,2,4,8,16", help="Blender batch sizes (prompts) to try")
    ap.add_argument("--our-sweep", default="4,8,16,32", help="rank.py batch sizes (rows) to try, reported only")
    ap.add_argument("--blender-fp16", action="store_true", help="time Blender in fp16 (its GPU setting, PairRM's "
                    "config fp16); the agreement check is fp32 either way")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/rank.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    batch_size = args.batch_size or (32 if cuda else 8)  # rank.py's defaults

    if args.data:
        recs = [json.loads(line) for line in open(args.data)][: args.n_prompts]
        records = [(r["prompt"], r["responses"][: args.k]) for r in recs]
    else:
        records = synthetic_records(args.n_prompts, args.k, max_answers=args.max_answers)
    k = len(records[0][1])
    cells = rank.ordered_pairs(k)
    pairs = [(p, c[i], c[j]) for p, c in records for i, j in cells]

    tmp = tempfile.TemporaryDirectory()
    path = args.ranker
    if args.ranker in SIZES:
        path = os.path.join(tmp.name, args.ranker)
        random_ranker(path, args.ranker, [t for p, c in records for t in [p, *c]], layers=args.layers)
    model, tok = pairrm.load_ranker(path, args.device, "fp32")
    model_bf16, _ = pairrm.load_ranker(path, args.device, "bf16")
    n_params = sum(p.numel() for p in model.parameters())
    llm_blender = import_llm_blender()
    blender = llm_blender.Blender()
    with open(os.path.join(path, "config.json")) as f:
        backbone = json.load(f)["model_name"]
    if not os.path.isdir(backbone):  # the directory was moved after the build: its backbone is beside it
        backbone = os.path.join(os.path.abspath(path), "backbone")
    blender.loadranker(path, device=args.device, model_name=backbone)
    row_tokens = [len(r) for r in pairrm.encode_pairs(tok, pairs)]
    print(f"ranker {args.ranker}: {n_params / 1e6:.1f}M parameters; {len(records)} prompts x K={k}: {len(pairs)} "
          f"ordered pairs, {np.mean(row_tokens):.0f} tokens per pair row (min {min(row_tokens)}, max {max(row_tokens)}); "
          f"{args.device}, {torch.get_num_threads()} threads")
    live = LiveResults(args.out, ["agreement", "sweep"] + [f"timed round {r + 1}" for r in range(args.repeats)],
                       benchmark="rank", command="python bench/bench_rank.py " + " ".join(
                           f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
                       machine=machine(), ranker=args.ranker, parameters=n_params, prompts=len(records), k=k,
                       pairs=len(pairs), mean_row_tokens=float(np.mean(row_tokens)))

    def ours(m, bs, recs=records):
        ps = [(p, c[i], c[j]) for p, c in recs for i, j in cells]
        flat = pairrm.pair_logits(m, tok, ps, bs, args.device)
        M = np.zeros((len(recs), k, k))
        M[:, [i for i, _ in cells], [j for _, j in cells]] = flat.reshape(len(recs), len(cells))
        return rank.bt_scores(M)

    def theirs(bs, recs=records):
        return np.asarray(blender.rank([p for p, _ in recs], [c for _, c in recs], return_scores=True,
                                       batch_size=bs, disable_tqdm=True), dtype=np.float64)

    # --- the scores agree (fp32): Blender's s_i against rank.bt_scores of rank.py's logits
    ref = theirs(8)
    mine = ours(model, batch_size)
    err = float(np.abs(mine - ref).max())
    scale = float(np.abs(ref).max())
    print(f"agreement (fp32): max |s_rank.py - s_Blender| = {err:.2e} (scores up to {scale:.2f})")
    live.point("agreement", agreement_max_abs=err, score_scale=scale)
    if err > 1e-3 * max(1.0, scale):
        raise SystemExit("rank.py and Blender disagree: not timing")

    # --- batch-size sweep on a quarter of the prompts (one warm-up pass first)
    sub = records[: max(1, len(records) // 4)]
    n_sub = len(sub) * len(cells)
    theirs(1, sub), ours(model, batch_size, sub)
    sweep = {f"blender bs={b}": (lambda b=b: theirs(b, sub)) for b in map(int, args.sweep.split(","))}
    sweep.update({f"rank.py bs={b}": (lambda b=b: ours(model, b, sub)) for b in map(int, args.our_sweep.split(","))})
    t_sweep, _ = interleaved(sweep, 1, sync)
    sweep_rate = {name: n_sub / ts[0] for name, ts in t_sweep.items()}
    best_bs = max((int(n.split("=")[1]) for n in sweep_rate if n.startswith("blender")),
                  key=lambda b: sweep_rate[f"blender bs={b}"])
    print("sweep (pairs/s on", len(sub), "prompts):", ", ".join(f"{n} {r:.1f}" for n, r in sweep_rate.items()))
    live.point("sweep", sweep_pairs_per_s=sweep_rate, blender_best_batch_size=best_bs)

    # --- the timed runs, round-robin; the table is written after every round
    fns = {f"rank.py fp32 bs={batch_size}": lambda: ours(model, batch_size),
           f"rank.py bf16 bs={batch_size}": lambda: ours(model_bf16, batch_size),
           "Blender bs=1 (released SPPO)": lambda: theirs(1)}
    if best_bs != 1:
        fns[f"Blender bs={best_bs} (its best)"] = lambda: theirs(best_bs)
    if args.blender_fp16:
        blender.ranker.half()
        fns = {n.replace("Blender", "Blender fp16"): f for n, f in fns.items()}
    times = {n: [] for n in fns}
    for r in range(args.repeats):
        t, results = interleaved(fns, 1, sync)
        for n in fns:
            times[n] += t[n]
        live.point(f"timed round {r + 1}", **timed_summary(times, results, ref, len(pairs), args.blender_fp16))
    rows = live.data["rows"]
    table(rows, [("method", "method", "{}"), ("seconds", "s (median)", "{:.2f}"), ("pairs_per_s", "pairs/s", "{:.1f}"),
                 ("vs_bs1", "x Blender bs=1", "{:.2f}"), ("max_score_error", "max |s - s_fp32|", "{:.1e}")])
    print(f"rank.py fp32 / Blender bs=1: {rows[0]['vs_bs1']:.2f}x; / Blender's best: "
          f"{live.data['ours_fp32_over_blender_best']:.2f}x; bf16 / Blender's best: "
          f"{live.data['ours_bf16_over_blender_best']:.2f}x")
    live.finish()


def timed_summary(times, results, ref, n_pairs, fp16):
    """The table so far (medians of the rounds run) and rank.py's speed against Blender's."""
    base = median(times["Blender fp16 bs=1 (released SPPO)" if fp16 else "Blender bs=1 (released SPPO)"])
    rows = [{"method": n, "seconds": median(ts), "pairs_per_s": n_pairs / median(ts), "vs_bs1": base / median(ts),
             "max_score_error": float(np.abs(results[n] - ref).max()), "all_seconds": [round(t, 3) for t in ts]}
            for n, ts in times.items()]
    best_theirs = max(r["pairs_per_s"] for r in rows if "Blender" in r["method"])
    return {"rows": rows, "ours_fp32_over_blender_bs1": rows[0]["vs_bs1"],
            "ours_fp32_over_blender_best": rows[0]["pairs_per_s"] / best_theirs,
            "ours_bf16_over_blender_bs1": rows[1]["vs_bs1"], "ours_bf16_over_blender_best": rows[1]["pairs_per_s"] / best_theirs}

if __name__ == "__main__":
    main()
