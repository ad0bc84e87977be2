"""Log-probs of given tokens under the output layer (lm_head), without ever holding the full logits.

For M positions with final hidden states h [M, width], an output layer W [V, width] and target tokens y [M],
    logits_i = h_i W^T                                   [V]
    logp_i   = logits_i[y_i] - logsumexp(logits_i)
and, for the upstream gradient g_i = dL/dlogp_i,
    dL/dlogits_i = g_i (onehot(y_i) - softmax(logits_i))  [V]
    dL/dh_i = dL/dlogits_i W          dL/dW = sum_i (dL/dlogits_i)^T h_i.

Why: at a large vocabulary the logits [M, V] are the largest tensors of a training step (3,200 response tokens
x 128,256 x 4 bytes = 1.6 GB, with as much again for their gradient and more for softmax temporaries). Here
they are made C positions at a time in one [C, V] buffer that every chunk reuses: the forward keeps only
each position's logsumexp (M numbers) besides its inputs, and the backward recomputes each chunk's logits
(one more matmul) and turns them into the chunk's gradient in place. No [M, V] tensor is ever allocated,
and the one reused buffer leaves no freed blocks for the allocator to hoard (measured: checkpointing each
chunk instead, which allocates and frees [C, V] temporaries per chunk, left ~1.8 GB of freed memory in
glibc's heap, counted in RSS, at vocabulary 128,256).

Precision: the matmuls run in `dtype` (bf16 under autocast, as lm_head's own matmul would); logsumexp,
softmax and the gradient of W, summed over chunks, are fp32.
"""
import torch


class TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, y, chunk, dtype):
        m, v = len(h), weight.shape[0]
        w = weight.to(dtype)  # [V, width]: a copy only when dtype differs (autocast)
        buf, work = buffers(min(chunk, m), v, dtype, h.device)
        target = torch.empty(m, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(target)
        for s in range(0, m, chunk):
            x = logits(h[s:s + chunk], w, buf, work)  # [C, V] fp32
            target[s:s + chunk] = x.gather(1, y[s:s + chunk, None]).squeeze(1)
            top = x.amax(1, keepdim=True)  # subtracted before exp, so exp cannot overflow; then in place:
            lse[s:s + chunk] = x.sub_(top).exp_().sum(1).log_() + top.squeeze(1)
        ctx.save_for_backward(h, weight, y, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return target - lse

    @staticmethod
    def backward(ctx, g):  # g [M]: dL/dlogp of each token
        h, weight, y, lse = ctx.saved_tensors
        chunk, dtype, m, v = ctx.chunk, ctx.dtype, len(h), weight.shape[0]
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit here
            w = weight.to(dtype)
            buf, work = buffers(min(chunk, m), v, dtype, h.device)
            grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            for s in range(0, m, chunk):
                hc, yc, gc = h[s:s + chunk].to(dtype), y[s:s + chunk], g[s:s + chunk].float()
                x = logits(hc, w, buf, work)
                d = x.sub_(lse[s:s + chunk, None]).exp_().mul_(-gc[:, None])  # -g softmax, in place
                d[torch.arange(len(yc), device=d.device), yc] += gc  # + g onehot(y) = dL/dlogits  [C, V]
                d = d if d.dtype == dtype else buf[:len(yc)].copy_(d)  # the matmuls in dtype, as autograd's
                grad_h[s:s + chunk] = d @ w
                if ctx.needs_input_grad[1]:
                    grad_w += d.T @ hc
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None, None


def buffers(c, v, dtype, device):
    """The chunk's logits in dtype, and an fp32 copy to work in (the same tensor when dtype is fp32)."""
    buf = torch.empty(c, v, dtype=dtype, device=device)
    return buf, (buf if dtype == torch.float32 else torch.empty(c, v, dtype=torch.float32, device=device))


def logits(hc, w, buf, work):
    """hc [C, width] @ w^T into the reused buffers; returns the chunk's fp32 logits [C, V]."""
    n = len(hc)
    torch.mm(hc.to(w.dtype), w.T, out=buf[:n])
    return work[:n] if work is buf else work[:n].copy_(buf[:n])


def token_logps(h, weight, y, chunk_elements=2**24):
    """log softmax(h weight^T)[y] per position: h [M, width], weight [V, width], y [M] -> [M] float32.

    Chunks of chunk_elements // V positions (64 MB of fp32 logits by default). The matmuls run in the
    autocast dtype when autocast is on (as lm_head's would), else in the inputs' dtype (bf16 under FSDP's
    mixed precision)."""
    device = h.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(h.dtype, weight.dtype))
    with torch.autocast(device, enabled=False):  # dtypes are explicit inside (and out= refuses autocast)
        return TokenLogps.apply(h, weight, y, max(1, chunk_elements // weight.shape[0]), dtype)
