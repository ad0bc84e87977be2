"""The tiny judge: a PairRM-shaped ranker trained on the tiny world's synthetic preference (world.judge_score).

Same architecture and input format as PairRM (llm-blender's DebertaV2PairRM: a DeBERTa-v2 backbone, the
<|source|> / <|candidate1|> / <|candidate2|> / <|candidate|> tokens, the two-layer head on [source; candidate]
marker states, M = head(x, y1) - head(x, y2)), only small: hidden 64, 2 layers, 2 heads, ~126k parameters,
a sentencepiece unigram vocabulary trained here (~200 pieces: the toy language has no more). Trained with
PairRM's own loss, -log sigmoid(M) for the preferred order (binary cross-entropy on M, label 1/2 for the
judge's ties), on both orders of each pair, so M_ij is a meaningful logit that y_i beats y_j. About 15 s on
one CPU thread, deterministic for a seed; held-out pairwise accuracy ~0.98 (printed in the build log).

    build_ranker("runs/tiny/world/ranker")      # what examples/tiny/build.py calls

writes DIR/ as two loaders want it, offline:
    DIR/config.json, model.safetensors, tokenizer.json   pairrm.load_ranker(DIR) (DebertaV2PairRM.from_pretrained)
    DIR/backbone/                                        the DeBERTa-v2 backbone + tokenizer: llm-blender's Blender
                                                         rebuilds the backbone from config.json's "model_name"
                                                         (microsoft/deberta-v3-large for the real PairRM) and then
                                                         loads DIR/model.safetensors over it
so that `Blender().loadranker(DIR, device="cpu")` works too. config.json's "model_name" is the absolute path
of DIR/backbone where the build put it; after moving DIR, pass `model_name=DIR + "/backbone"` to loadranker.
"""
import io
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import world  # noqa: E402
from pairrm import CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX, SOURCE_PREFIX, encode_pairs, pairrm_class  # noqa: E402


def build_tokenizer(texts, vocab_size, total_size=None):
    """A DeBERTa-v2 tokenizer over a sentencepiece unigram model trained on `texts`, with PairRM's tokens.
    total_size: pad the vocabulary with unused pieces ("[unused7]", never chosen for text) so that the
    tokenizer has exactly this many tokens, as a real-sized model's embedding has rows (PairRM: 128,005 =
    DeBERTa-v3's 128,000 pieces + [MASK] + the 4 PairRM tokens); llm-blender resizes the embedding it
    builds to len(tokenizer) before loading the weights, so the two must agree."""
    import sentencepiece as spm
    from transformers import DebertaV2Tokenizer
    buf = io.BytesIO()
    # DeBERTa-v3's layout: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3; the toy language has few distinct pieces, so
    # the vocabulary may come out smaller than asked (hard_vocab_limit=False).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", character_coverage=1.0, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if total_size is not None:
        n_pieces = total_size - 5  # [MASK] and the 4 PairRM tokens follow the pieces
        if n_pieces < len(vocab):
            raise ValueError(f"total_size {total_size} is below the {len(vocab) + 5} tokens the text needs")
        vocab += [(f"[unused{i}]", -1e4) for i in range(n_pieces - len(vocab))]
    tok = DebertaV2Tokenizer(vocab=vocab, unk_id=3)
    tok.add_tokens(["[MASK]"], special_tokens=True)
    # As llm-blender's collator adds them: plain added tokens, after the vocabulary.
    tok.add_tokens([SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX])
    return tok


def make_pairs(rng, n, version=1):
    """(prompt, a, b, label): label = world.preference(a, b): in world v1 1 if the judge prefers a, 0 if b, 1/2
    for a tie (so that M is near 0 when the judge has no preference, and self-play is not pushed by noise); in
    v2 the judge's probability. Each pair's answers are drawn with their own rates of every quality so that
    every combination is common."""
    out = []
    for prompt in world.make_prompts(rng, n):
        if version == 1:
            a, b = (world.make_answer(rng, prompt, rng.random(), rng.uniform(0, 0.6)) for _ in range(2))
        else:
            a, b = (world.make_answer(rng, prompt, rng.random(), rng.uniform(0, 0.6), rng.random(), rng.random())
                    for _ in range(2))
        out.append((prompt, a, b, world.preference(a, b, version)))
    return out


def batch(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def build_ranker(out, seed=0, steps=250, n_train=4000, n_test=500, batch_size=16, lr=1e-3, backbone_path=None, log=print,
                 version=1):
    """Train and save the tiny ranker to `out`; returns its pairwise accuracy on held-out pairs.
    backbone_path: where out/backbone will finally be (if `out` is renamed afterwards), for Blender.
    version: the tiny world's (world.preference)."""
    from transformers import DebertaV2Config
    t0 = time.time()
    rng = random.Random(seed)
    train, test = make_pairs(rng, n_train, version), make_pairs(rng, n_test, version)
    texts = [t for p, a, b, _ in train for t in (p, a, b)]
    tok = build_tokenizer(texts, vocab_size=400)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (("source_prefix_id", SOURCE_PREFIX),
           ("cand1_prefix_id", CAND1_PREFIX), ("cand2_prefix_id", CAND2_PREFIX), ("cand_prefix_id", CAND_PREFIX))}
    config = DebertaV2Config(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        max_position_embeddings=512, type_vocab_size=0, relative_attention=True, max_relative_positions=-1,
        position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, layer_norm_eps=1e-7, pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # a few hundred steps: no time to overfit
        # PairRM's own fields (DebertaV2PairRM reads them)
        n_tasks=1, drop_out=0.05, sep_token_id=tok.sep_token_id, **ids)
    torch.manual_seed(seed)
    model = pairrm_class()(config)

    # Both orders of every pair: PairRM's loss, -log sigmoid(+-M), is BCE on M with label 1 / 0.
    rows = encode_pairs(tok, [(p, a, b) for p, a, b, _ in train] + [(p, b, a) for p, a, b, _ in train])
    labels = torch.tensor([y for *_, y in train] + [1 - y for *_, y in train])

    def batch_loss(g):
        idx = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        input_ids, mask = batch([rows[i] for i in idx], tok.pad_token_id)
        M = model(input_ids=input_ids, attention_mask=mask, return_dict=True).logits
        return torch.nn.functional.binary_cross_entropy_with_logits(M, labels[idx])
    world.fit(model, steps, lr, batch_loss, seed, "ranker", log)

    # Held-out pairwise accuracy, both orders: where the judge decides, the sign of M must follow it.
    test_rows = encode_pairs(tok, [(p, a, b) for p, a, b, _ in test] + [(p, b, a) for p, a, b, _ in test])
    test_labels = torch.tensor([y for *_, y in test] + [1 - y for *_, y in test])
    with torch.no_grad():
        M = torch.cat([model(*batch(test_rows[i:i + 64], tok.pad_token_id), return_dict=True).logits
                       for i in range(0, len(test_rows), 64)])
    decided = test_labels != 0.5
    accuracy = ((M[decided] > 0) == (test_labels[decided] > 0.5)).float().mean().item()  # v2's labels are soft
    log(f"  ranker held-out pairwise accuracy {accuracy:.3f} ({decided.sum().item()} ordered pairs the judge decides; "
        f"mean |M| {M[decided].abs().mean():.1f} there, {M[~decided].abs().mean():.1f} on ties) in {time.time() - t0:.1f}s")

    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.pretrained_model.save_pretrained(os.path.join(out, "backbone"))
    tok.save_pretrained(os.path.join(out, "backbone"))
    # llm-blender's Blender reads its RankerConfig from the same config.json (unknown keys are ignored on both
    # sides): PairRM's released values, and the backbone to rebuild instead of microsoft/deberta-v3-large.
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(ranker_type="pairranker", model_name=os.path.abspath(backbone_path or os.path.join(out, "backbone")),
               source_maxlength=1224, candidate_maxlength=412, inference_mode="full", fp16=False)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return accuracy


if __name__ == "__main__":
    torch.set_num_threads(1)  # as in build.py
    build_ranker(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_ranker")
