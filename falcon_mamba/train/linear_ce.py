"""Fused linear cross-entropy: the summed next-token loss of ``lm_head(h)`` without materialising the
(B, L, V) logits.

The plain objective, ``F.cross_entropy(lm_head(h).float(), targets)``, holds the logits in the
compute dtype, their fp32 copy, and the fp32 softmax gradient at once: at 8 x 2048 tokens and
Falcon's 65,024-token vocabulary that is 2.1 + 4.3 + 4.3 GB, all of it rewritten in the backward.
Here the (selected) tokens are cut into chunks of ``chunk`` rows; each chunk's logits are computed
in the compute dtype (the matmul accumulates in fp32), upcast, reduced to the log-sum-exp in fp32,
and (when a gradient is needed) turned into the softmax gradient at once, which gives that chunk's
grad of h (g @ W) and its share of the grad of W (g^T @ h, summed over chunks in fp32). The backward
only scales these two by the incoming gradient. Nothing of size (N, V) outlives a chunk, and no
logits are stored or recomputed: the lm_head costs its usual three matmuls.

Numerics equal the plain path's: the logits are rounded to the compute dtype (as lm_head's output
under autocast is), the log-sum-exp and softmax are fp32, the softmax gradient is rounded to the
compute dtype before the two gradient matmuls (as autocast's backward does). The grad of W is summed
over chunks in fp32 (the plain path rounds the whole sum to bf16 once).

Tokens that are not trained on (``mask`` False, or the target equal to ``ignore_index``) are
dropped before the matmul: with an assistant-only SFT mask the lm_head then costs only the
assistant tokens.

Legend: B rows, L length, N tokens (B*L, or those selected), H hidden, V vocab.
"""

from __future__ import annotations

import torch

# Logit elements per chunk: 2^27 is 512 MiB in fp32 (~1 GiB with the chunk's bf16 logits and
# gradient), 2,048 tokens at V = 65,024: the matmuls run at full rate, and the fp32 grad of W (read
# and written once per chunk, 0.5 GB at H 2048) costs ~0.3 ms per chunk, ~0.5% of a 1.5B step.
CHUNK_ELEMENTS = 1 << 27


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: ~CHUNK_ELEMENTS logits, a multiple of 64 (tensor-core tiles)."""
    return max(64, CHUNK_ELEMENTS // vocab_size // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH: torch.Tensor, W_VH: torch.Tensor, targets_N: torch.Tensor, chunk: int,
                dtype: torch.dtype, need_h: bool, need_w: bool, rows_kernel: bool) -> torch.Tensor:
        N = h_NH.shape[0]
        W = W_VH.to(dtype)  # one cast for every chunk (autocast caches the same one)
        h = h_NH.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_W = torch.zeros(W_VH.shape, dtype=torch.float32, device=h.device) if need_w else None
        if rows_kernel:
            from falcon_mamba.ops import triton_backend  # Triton: imported only where it runs
        for lo in range(0, N, chunk):
            hc, tc = h[lo:lo + chunk], targets_N[lo:lo + chunk]
            if rows_kernel:  # ops/triton_ce.py: the math below in one kernel, g over the logits
                g = hc @ W.t()  # (n, V) in dtype
                loss += triton_backend.ce_rows_(g, tc, need_h or need_w).sum()
            else:
                logits = (hc @ W.t()).float()  # (n, V): rounded to dtype, then fp32 (a copy unless fp32)
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    # d(lse - logit[t]) / d logits = softmax - onehot(t), computed in place.
                    g = logits.sub_(lse[:, None]).exp_()
                    g.scatter_add_(1, tc[:, None], torch.full((g.shape[0], 1), -1.0, device=g.device))
                    g = g.to(dtype)
            if need_h or need_w:
                if need_h:
                    grad_h[lo:lo + chunk] = g @ W
                if need_w:
                    if dtype == torch.float32:
                        grad_W.addmm_(g.t(), hc)
                    else:
                        grad_W += g.t() @ hc  # fp32 accumulation inside the matmul, fp32 across chunks
        ctx.save_for_backward(grad_h, grad_W)
        ctx.h_dtype, ctx.w_dtype = h_NH.dtype, W_VH.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_W = ctx.saved_tensors
        gh = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype)).to(ctx.h_dtype)
        gw = None if grad_W is None else grad_W.mul_(grad_loss).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None


def compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(h, weight)`` computes in here: autocast's when it is on, else their own."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor | None = None, ignore_index: int = -100,
                         chunk: int = 0, rows_kernel: bool | None = None) -> torch.Tensor:
    """sum over trained targets of cross_entropy(h @ weight^T, target), as an fp32 scalar.

    h (..., H) in any float dtype; weight (V, H) (the lm_head's, or the tied embedding table);
    targets (...) int64 with h's leading shape; mask (...) bool or None: False drops a target, as
    does a target equal to ``ignore_index`` (F.cross_entropy's convention). ``chunk``: tokens per
    chunk (0: default_chunk(V)). Equals ``(F.cross_entropy(F.linear(h, weight).float(), targets,
    reduction="none") * mask).sum()`` within rounding, forward and backward, under autocast too.
    ``rows_kernel``: each chunk's softmax step by ops/triton_ce.py (None: where the op backend is
    Triton, the GPU default) instead of the PyTorch ops of the forward."""
    H = h.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (vocab, {H}), got {tuple(weight.shape)}")
    if targets.shape != h.shape[:-1] or (mask is not None and mask.shape != targets.shape):
        raise ValueError(f"targets {tuple(targets.shape)} and mask must have h's leading shape "
                         f"{tuple(h.shape[:-1])}")
    h_NH, t_N = h.reshape(-1, H), targets.reshape(-1)
    keep = t_N != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1)
    V = weight.shape[0]
    # one host sync for both: a trained target outside the vocabulary (the row kernel would read
    # past its row; gather would fail on the device), and whether tokens are dropped
    all_kept, out_of_range = torch.stack([keep.all(), (keep & ((t_N < 0) | (t_N >= V))).any()]).tolist()
    if out_of_range:
        raise ValueError(f"targets must be token ids in [0, {V}) (or ignore_index {ignore_index}); "
                         "some are not: check the data's vocabulary against the model's")
    if not all_kept:  # the selection spares the lm_head the dropped tokens
        idx = keep.nonzero().squeeze(1)
        h_NH, t_N = h_NH.index_select(0, idx), t_N.index_select(0, idx)
    grad_on = torch.is_grad_enabled()
    dtype = compute_dtype(h, weight)
    chunk = chunk if chunk > 0 else default_chunk(V)
    if rows_kernel is None:
        from falcon_mamba import ops

        rows_kernel = h.device.type == "cuda" and ops.backend_name(h.device) == "triton"
    with torch.autocast(h.device.type, enabled=False):  # the Function casts explicitly
        return _LinearCrossEntropy.apply(h_NH, weight, t_N, chunk, dtype, grad_on and h_NH.requires_grad,
                                         grad_on and weight.requires_grad, rows_kernel)
