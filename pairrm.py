"""PairRM, the preference model of SPPO: loading it, encoding a pair as PairRM reads it, and scoring pairs.
rank.py (the KxK matrix of each prompt) and evaluate.py (a model against a baseline) both use it.

PairRM (llm-blender/PairRM-hf, 0.4B, a DeBERTa-v3-large backbone) reads one prompt and two candidates and
returns a logit M: M > 0 means the first candidate is the better answer. It has a position bias: M(a, b) is
not -M(b, a) in general, so callers ask both orders.
"""
import importlib.util
import os

import numpy as np

from common import InputError, is_hub_id

# PairRM's input format (llm_blender.blender.blender_utils.tokenize_pair, the PairRM-hf model card)
SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
SOURCE_MAX_LENGTH = 1224  # tokens of [CLS] <|source|> prompt [SEP]
MAX_LENGTH = 2048  # the two candidates share what the source leaves of this, half each
DTYPES = ("fp16", "bf16", "fp32")


def default_dtype(device):
    """fp16 on CUDA: llm-blender's loadranker halves PairRM there (the release's setting), and its logits stay
    ~10x closer to fp32's than bf16's (bench/bench_pairrm_precision.py, BENCHMARKS.md); fp32 on a CPU, which
    has no fast fp16 kernels."""
    return "fp16" if device.startswith("cuda") else "fp32"


def default_batch_size(device):
    """Pair rows per forward: 32 on CUDA, 8 on a CPU (rank.py and evaluate.py)."""
    return 32 if device.startswith("cuda") else 8


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no overflow for large |x|



# -----------------------------------------------------------------------------
# loading

def pairrm_class():
    """llm-blender's DebertaV2PairRM (plain transformers). Loaded from its file alone: `import llm_blender`
    also imports vLLM and every reward model llm-blender knows (~10 s), none of which ranking needs."""
    spec = importlib.util.find_spec("llm_blender")
    if spec is None:
        raise InputError("the llm-blender package (PairRM's model class) is not installed: pip install llm-blender")
    path = os.path.join(spec.submodule_search_locations[0], "pair_ranker", "pairrm.py")
    module_spec = importlib.util.spec_from_file_location("_llm_blender_pairrm", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.DebertaV2PairRM


def check_ranker_path(path):
    """InputError unless `path` is a complete ranker directory or looks like a hub id (checked when loading)."""
    if os.path.isdir(path):
        missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, f))]
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "spm.model")):
            missing.append("tokenizer.json or spm.model")
        if missing:
            raise InputError(f"--ranker {path}: incomplete ranker directory (no {', '.join(missing)})")
    elif not is_hub_id(path):
        raise InputError(f"--ranker {path}: no such ranker directory")


def load_ranker(path, device="cpu", dtype="fp32"):
    """(model, tokenizer) of PairRM from a hub id (llm-blender/PairRM-hf) or a local save_pretrained directory.

    A complete local directory (config.json, model.safetensors, tokenizer) needs no download: the backbone
    is built from config.json, not from microsoft/deberta-v3-large. Bad paths are an InputError.
    """
    check_ranker_path(path)
    import torch
    from transformers import AutoTokenizer
    cls = pairrm_class()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    except Exception as e:  # hub, config and weight errors come in many types; all mean "cannot load"
        raise InputError(f"--ranker {path}: cannot load PairRM ({type(e).__name__}: {str(e).strip().splitlines()[0]})")
    for name, token in (("source_prefix_id", SOURCE_PREFIX), ("cand1_prefix_id", CAND1_PREFIX),
                        ("cand2_prefix_id", CAND2_PREFIX)):
        if getattr(model.config, name, None) != tokenizer.convert_tokens_to_ids(token):
            raise InputError(f"--ranker {path}: config {name} does not match the tokenizer's {token} (not a PairRM checkpoint?)")
    return model.to(device).eval(), tokenizer


# -----------------------------------------------------------------------------
# encoding and scoring

def _clean(text):
    # A response that contains one of PairRM's marker strings would give its row a second marker token and
    # misalign the model's gather of marker positions; PairRM itself would crash on it. Blank them out.
    for marker in (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX):
        if marker in text:
            text = text.replace(marker, " ")
    return text


def _truncate(ids, n):
    """What tokenizer.encode(..., max_length=n, truncation=True) gives: [CLS] + first n-2 tokens + [SEP]."""
    return ids if len(ids) <= n else ids[: n - 1] + ids[-1:]


def encode_pairs(tokenizer, pairs):
    """Token ids of PairRM's input for each (source, candidate1, candidate2): identical to llm-blender's
    tokenize_pair, i.e. [CLS] <|source|> x [SEP] [CLS] <|candidate1|> y1 [SEP] [CLS] <|candidate2|> y2 [SEP],
    the source cut to 1224 tokens and each candidate to (2048 - len(source)) // 2. Every distinct string is
    tokenised once, untruncated; truncation then only cuts the token list (what the tokenizer does too)."""
    cand1_id, cand2_id = tokenizer.convert_tokens_to_ids(CAND1_PREFIX), tokenizer.convert_tokens_to_ids(CAND2_PREFIX)
    sources = sorted({s for s, _, _ in pairs})
    cands = sorted({c for _, a, b in pairs for c in (a, b)})
    enc = tokenizer([SOURCE_PREFIX + _clean(s) for s in sources] + [CAND1_PREFIX + _clean(c) for c in cands])["input_ids"]
    src = {s: _truncate(ids, SOURCE_MAX_LENGTH) for s, ids in zip(sources, enc)}
    c1 = dict(zip(cands, enc[len(sources):]))
    c2 = {}
    for c, ids in c1.items():
        # Both markers are added tokens, so the text after them tokenises the same way: swap the one id.
        k = ids.index(cand1_id)
        c2[c] = ids[:k] + [cand2_id] + ids[k + 1:]
    rows = []
    for s, a, b in pairs:
        n = (MAX_LENGTH - len(src[s])) // 2
        rows.append(src[s] + _truncate(c1[a], n) + _truncate(c2[b], n))
    return rows


def count_long_sources(tokenizer, prompts):
    """How many prompts PairRM will read only the start of (its source keeps SOURCE_MAX_LENGTH tokens)."""
    return sum(len(tokenizer(SOURCE_PREFIX + _clean(p))["input_ids"]) > SOURCE_MAX_LENGTH for p in prompts)


def pair_logits(model, tokenizer, pairs, batch_size=8, device="cpu", progress_bar=None):
    """PairRM logit M for each (source, candidate1, candidate2): M > 0 means candidate1 is preferred.

    Rows of all pairs are sorted by length and run batch_size at a time (right padding, which PairRM trims
    to the longest row of each batch), so pairs of many prompts share forwards. float64 array [len(pairs)].
    """
    import torch
    rows = encode_pairs(tokenizer, pairs)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.empty(len(rows), dtype=np.float64)
    pad = tokenizer.pad_token_id
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in idx], device=device)
            mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in idx], device=device)
            logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
            out[idx] = logits.float().cpu().numpy()
            if progress_bar is not None:
                progress_bar.update(len(idx))
    return out
