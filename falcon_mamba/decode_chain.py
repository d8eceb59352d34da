"""The batch-1 decode step as a chain of four GEMV-centred launches per layer ("chain" mode).

Legend: H hidden width, D inner width, N state size, R dt rank, V vocab, nL layers, K conv taps.

Per layer: in_proj (its RMSNorm prologue reads a precomputed 1/rms), x_proj (the conv step computed
as its input), the fused SSM step (redoes the conv for its channels, shifts the conv state) and
out_proj, whose epilogue adds its output to the fp32 residual stream and leaves the 1/rms of the
next norm (ops/triton_gemv.py, ``norm_out`` / ``rstd``). Against the conv-folded GEMV mode this
drops the add+RMSNorm launch of every layer but the first; against the fused mode, the prologue no
longer sums the row's squares in every program. Same math as model.step up to the order of the
sum of squares (program partials summed in program order: deterministic).
"""

from __future__ import annotations

import torch


def chain_supported(model) -> bool:
    """in_proj, out_proj and lm_head are GEMV weights (bias-free dense Linear or QuantLinear) and the
    conv step folds into x_proj and the SSM kernel (decode_step.conv_fold_supported)."""
    from falcon_mamba.decode_step import conv_fold_supported
    from falcon_mamba.ops.triton_gemv import GemvWeight

    mods = [model.lm_head] + [getattr(b.mixer, n) for b in model.backbone.layers
                              for n in ("in_proj", "out_proj")]
    return conv_fold_supported(model) and all(GemvWeight.from_module(m) is not None for m in mods)


@torch.no_grad()
def chain_step(model, tokens_B: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
    """tokens (1,) -> logits (1, V) fp32 (equal to the model dtype's values); conv (nL, 1, K-1, D) and
    ssm (nL, 1, D, N) advance in place. The fp32 residual stream ping-pongs between two rows (the
    out_proj epilogue reads one row while writing the other)."""
    from falcon_mamba.decode_step import _conv_folded, _ops
    from falcon_mamba.ops.triton_gemv import GemvWeight, fused_gemv

    c = model.config
    R, N = c.time_step_rank, c.state_size
    dt = model.dtype
    layers = model.backbone.layers
    norm_eps = c.mixer_rms_eps if c.bcdt_rms else None
    hbufs = torch.empty(2, c.hidden_size, dtype=torch.float32, device=tokens_B.device)
    first = layers[0].norm
    u = _ops().add_rms_norm(model.backbone.embeddings(tokens_B), None, first.weight, first.eps,
                            round_to=first.weight.dtype, h_out=hbufs[0])
    h, rstd = hbufs[0], None
    for i, blk in enumerate(layers):
        m, w = blk.mixer, blk.norm.weight
        if rstd is None:
            xz = fused_gemv(GemvWeight.from_module(m.in_proj), u, out_dtype=dt)
        else:
            xz = fused_gemv(GemvWeight.from_module(m.in_proj), h, norm_weight=w, eps=blk.norm.eps, rstd=rstd,
                            round_in=w.dtype, round_y=w.dtype, out_dtype=dt)
        y = _conv_folded(m, ssm[i], conv[i], xz[None], norm_eps, R, N)
        # the next norm: the next block's (its input rounded to the weight dtype) or norm_f (fp32)
        nxt = layers[i + 1].norm if i + 1 < len(layers) else model.backbone.norm_f
        round_in = nxt.weight.dtype if i + 1 < len(layers) else None
        h_next = hbufs[(i + 1) % 2]
        _, rstd = fused_gemv(GemvWeight.from_module(m.out_proj), y.reshape(-1),
                             norm_out=(h, h_next, nxt.eps, round_in))
        h = h_next
    norm_f = model.backbone.norm_f
    logits = fused_gemv(GemvWeight.from_module(model.lm_head), h, norm_weight=norm_f.weight, eps=norm_f.eps,
                        rstd=rstd, out_dtype=torch.float32, round_to=dt)
    return logits[None]
