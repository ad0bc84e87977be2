"""Chunked log-probs (logps.token_logps, train_sppo.sequence_logps) equal the unchunked computation they replace:
the same log-probs and the same gradients (w.r.t. the hidden states, lm_head's weight, and every model
parameter end to end) to fp32 rounding, under bf16 autocast, and under FSDP2 on 2 gloo processes.

    python -m pytest -q tests/test_logps.py
The FSDP2 check runs this file under torchrun (see fsdp_worker at the bottom)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from logps import token_logps  # noqa: E402
from train_sppo import collate, sequence_logps  # noqa: E402
from train_sppo import sequence_logps_unchunked as unchunked_logps  # noqa: E402  (the whole-logits computation)

torch.set_num_threads(1)
FP32 = contextlib.nullcontext


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_llama(vocab, tied, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=tied, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def batch(vocab, prompts=3, k=2, seed=0):
    """collate's left-padded rows: prompts of 3-12 tokens, k responses each of 1-20 tokens."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(lo, hi, (), generator=g).item()  # noqa: E731
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(rand(3, 13)), "responses": [ids(rand(1, 21)) for _ in range(k)]}
                for _ in range(prompts)]
    return collate(examples, list(range(prompts)), 0, "cpu")


def close(a, b, tol):
    """max |a - b| <= tol x max |b|: fp32 rounding, relative to the tensor's scale."""
    assert a.shape == b.shape and a.dtype == b.dtype
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def grads_of(model, logps, weights):
    model.zero_grad(set_to_none=True)
    (logps * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("vocab", [1000, 32000])
@pytest.mark.parametrize("chunk", [1, 7, 10**9])  # positions per chunk: 1, uneven chunks, one chunk
def test_token_logps_equal_log_softmax(vocab, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, vocab, bias=False)
    h = torch.randn(45, 32, requires_grad=True)
    y = torch.randint(0, vocab, (45,))
    g = torch.randn(45)  # the upstream gradient (in SPPO: 2 x each row's error, the same for a row's tokens)
    full = torch.log_softmax(head(h), -1).gather(-1, y[:, None]).squeeze(-1)
    dh, dw = torch.autograd.grad((full * g).sum(), [h, head.weight])
    got = token_logps(h, head.weight, y, chunk_elements=chunk * vocab)
    dh2, dw2 = torch.autograd.grad((got * g).sum(), [h, head.weight])
    close(got, full.detach(), 1e-6)
    close(dh2, dh, 1e-5)
    close(dw2, dw, 1e-5)


@pytest.mark.parametrize("vocab,tied,checkpointing", [(1000, False, False), (1000, True, True), (32000, False, False)])
def test_sequence_logps_equal_unchunked(vocab, tied, checkpointing):
    """End to end: log-probs and every parameter's gradient; chunks of 5 positions cross row boundaries.
    Also with the model's own gradient checkpointing (--gradient-checkpointing) and a tied lm_head."""
    model = tiny_llama(vocab, tied)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, mask, labels = batch(vocab)
    w = torch.randn(len(labels))
    want = unchunked_logps(model, input_ids, mask, labels, FP32)
    got = sequence_logps(model, input_ids, mask, labels, FP32, chunk_elements=5 * vocab)
    close(got.detach(), want.detach(), 1e-6)
    g_want, g_got = grads_of(model, want, w), grads_of(model, got, w)
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        close(g_got[name], g_want[name], 1e-5)
    with torch.no_grad():  # the reference pass: no graph, same numbers
        close(sequence_logps(model, input_ids, mask, labels, FP32, chunk_elements=5 * vocab), want.detach(), 1e-6)


def test_bf16_autocast():
    """Under autocast the chunks' matmul is bf16 as lm_head's is: the same log-probs as the unchunked bf16
    computation to fp32 rounding, visibly not the fp32 ones (the lm_head matmul in fp32 differs ~200x more)."""
    model = tiny_llama(1000, False)
    input_ids, mask, labels = batch(1000)
    w = torch.randn(len(labels))
    want = unchunked_logps(model, input_ids, mask, labels, bf16)
    got = sequence_logps(model, input_ids, mask, labels, bf16, chunk_elements=5 * 1000)
    fp32 = unchunked_logps(model, input_ids, mask, labels, FP32).detach()
    assert got.dtype == torch.float32
    close(got.detach(), want.detach(), 1e-6)
    assert (got.detach() - fp32).abs().max() > 10 * (got.detach() - want.detach()).abs().max()
    g_want, g_got = grads_of(model, want, w), grads_of(model, got, w)
    for name in g_want:
        # lm_head's gradient is a bf16 matmul: one rounding of the whole sum there, one per chunk (summed in
        # fp32) here, so they differ by bf16 rounding (2^-8); the hidden states' gradient is row by row, equal
        close(g_got[name], g_want[name], 1e-2 if name == "lm_head.weight" else 1e-5)


# -----------------------------------------------------------------------------
# FSDP2: 2 gloo processes, each shards the model as train_sppo.main does and computes its half of the rows

def shard(model, mp=None):
    """As train_sppo.main: each decoder layer is its own FSDP2 group, then the root (the rest)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    for m in model.modules():
        if type(m).__name__ in model._no_split_modules:
            fully_shard(m, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=mp or MixedPrecisionPolicy())
    return model


def fsdp_worker():
    """Run under torchrun. fp32: 1-process unchunked log-probs and gradients, then chunked with the rows split
    over the processes under FSDP2 (a no-grad pass first, as main's reference pass, then reshard, forward, backward).
    bf16 (FSDP's mixed precision: bf16 parameters, fp32 gradient reduction): chunked and unchunked under
    FSDP2 agree. Rank 0 prints OK when all match."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    input_ids, mask, labels = batch(1000, prompts=4)
    w = torch.randn(len(labels), generator=torch.Generator().manual_seed(1))
    mine = slice(rank, None, world)  # this process's rows; FSDP averages gradients, so x world
    rows = (input_ids[mine], mask[mine], labels[mine])
    for tied in (False, True):
        model = tiny_llama(1000, tied)
        want = unchunked_logps(model, input_ids, mask, labels, FP32)  # 1 process, all rows
        g_want = grads_of(model, want, w)
        shard(model)
        with torch.no_grad():
            ref = sequence_logps(model, *rows, FP32, chunk_elements=5000)
        model.reshard()
        got = sequence_logps(model, *rows, FP32, chunk_elements=5000)
        (got * w[mine] * world).sum().backward()
        close(ref, want[mine].detach(), 1e-6)
        close(got.detach(), want[mine].detach(), 1e-6)
        for name, p in model.named_parameters():
            close(p.grad.full_tensor(), g_want[name], 1e-5)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results = []
    for fn in (unchunked_logps, lambda *a: sequence_logps(*a, chunk_elements=5000)):
        model = shard(tiny_llama(1000, False), mp)
        lp = fn(model, *rows, FP32)
        (lp * w[mine] * world).sum().backward()
        results.append((lp.detach(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}))
    (want_lp, g_want), (got_lp, g_got) = results
    close(got_lp, want_lp, 1e-6)
    for name in g_want:  # lm_head: one bf16 matmul vs one per chunk, bf16 rounding apart (see test_bf16_autocast)
        close(g_got[name], g_want[name], 1e-2 if name == "lm_head.weight" else 1e-5)
    dist.barrier()
    if rank == 0:
        print("FSDP OK")
    dist.destroy_process_group()


def test_fsdp_two_processes_equal_one():
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0 and "FSDP OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


if __name__ == "__main__":
    fsdp_worker()


def test_soft_capped_logits_take_the_whole_logits_path():
    """Gemma-2 caps its logits (cap * tanh(logits / cap)), which the chunked path cannot express: sequence_logps
    then computes from the model's own (capped) logits, and agrees with log_softmax of them."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=0.5, pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    input_ids, mask, labels = batch(500)
    got = sequence_logps(model, input_ids, mask, labels, FP32)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1]
    assert logits.abs().max() <= 0.5  # capped
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    close(got.detach(), logp.masked_fill(labels[:, 1:] == -100, 0).sum(-1), 1e-5)
