"""The decode step with the fused kernels: what the decode graphs capture (decode/graphs.py).

Legend: B batch, nL layers, K conv taps, D inner width, N state size, R dt rank, V vocab.

``fast_step`` is FalconMamba.step with the fused kernels of ops/triton_decode.py: per layer one
add+RMSNorm kernel, in_proj, one conv-step kernel, x_proj, one fused SSM kernel (norms, dt_proj,
softplus, state update, D skip, gate) and out_proj; then add+norm_f and lm_head. At batch 1 the
projection mode (decode/modes.py) picks how the projections run:
- gemv ("triton"): the projections by the Triton GEMV of ops/triton_gemv.py (dense or QuantLinear);
- conv_fold (with gemv; "triton_cx"): no conv-step launch: x_proj's GEMV computes the conv step
  as its input and the fused SSM kernel recomputes it for its channels and updates the conv state
  (where x_proj is a GEMV weight and dt_proj is fusable: conv_fold_supported);
- xproj_merge (with gemv; "triton_xp"): int4 x_proj as extra programs of the packed in_proj launch.
Above DT_PROJ_MAX_BATCH rows, split_x ("split_x", "split_x_lt") runs x_proj and dt_r's norm by
ops/triton_xproj.py (split-K partials, then one kernel summing them) instead of cuBLAS + its split-K
reduce + the norm kernel.
dt_proj is fused into the SSM kernel when it is a dense Linear or a QuantLinear whose bias is added
outside its forward (the model's: the scan adds it in fp32); the kernel dequantizes it (_dt_weight).
Where a batch-1 GEMV is the packed int4 kernel (ops/triton_gemv_i4.py: int4 g128 in_proj, out_proj,
lm_head at the tuned shapes), the kernel producing its input (the norm, the SSM step) also stores
that input in the kernel's pair layout (_pairs_buffer), and in_proj takes the conv step as its
epilogue (no conv-step launch).
"""

from __future__ import annotations

import torch


def _ops():
    from falcon_mamba.ops import triton_backend

    return triton_backend


def _dense(mod) -> bool:
    """A plain nn.Linear (a quantized drop-in has no dense weight to hand to the fused kernel)."""
    return isinstance(mod, torch.nn.Linear) and mod.weight.dtype in (torch.float32, torch.bfloat16,
                                                                    torch.float16)


def _dt_weight(mod):
    """dt_proj's weight as the fused SSM kernel takes it: the dense tensor of a Linear (its bias is
    the kernel's dt bias), the GemvWeight of a QuantLinear without a bias in its forward, else None."""
    if _dense(mod):
        return mod.weight
    from falcon_mamba.ops.triton_gemv import GemvWeight
    from falcon_mamba.quant.qlinear import QuantLinear

    return GemvWeight.from_module(mod) if isinstance(mod, QuantLinear) else None


def _proj(mod, x: torch.Tensor, gemv: bool, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """mod(x), or for one row the Triton GEMV (ops/triton_gemv.py, tuned per shape and format)
    through a bias-free dense or quantized Linear when asked. pairs: x in the packed int4 kernel's
    pair layout, written by x's producer (_pairs_buffer)."""
    if gemv and x.shape[0] == 1:
        from falcon_mamba.ops.triton_gemv import GemvWeight, fused_gemv

        w = GemvWeight.from_module(mod)
        if w is not None:
            xr = x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)
            return fused_gemv(w, xr, x_pairs=pairs)[None]
    return mod(x)


def _pairs_buffer(mod, rows: int, dtype: torch.dtype, device, gemv: bool) -> torch.Tensor | None:
    """An empty (K,) buffer for the producer of mod's input (rows x K of dtype) to fill with the
    pair-layout copy (triton_decode._pair_index) where mod's batch-1 GEMV is the packed int4 kernel
    that reads it (bf16 input, K a multiple of 8 and unpadded); else None."""
    if not gemv or rows != 1 or dtype != torch.bfloat16 or device.type != "cuda":
        return None
    from falcon_mamba.ops.triton_gemv import GemvWeight, packed_int4

    w = GemvWeight.from_module(mod)
    if w is None or w.K % 8 or w.w.shape[1] * 2 != w.K or not packed_int4(w, device):
        return None
    return torch.empty(w.K, dtype=dtype, device=device)


# SSM-step channels per program in the merged-x_proj int4 mode: 16 there saved ~0.5 us per 7B layer
# against 32, which the other modes keep (16 cost bf16 ~2.1 and int8 ~1.5 us per layer;
# benchmarks/sweep_xproj.py, results/archive/dev-runs/h100-sweep-xproj-6233aa4.json)
XP_SSM_BLOCK_D = 16


def _ssm_tail(ops, m, ssm_i, xc, z, xdbl, norm_eps, R: int, N: int, pairs=None, block_d=None,
              dt_normed: bool = False):
    """x_proj output -> (gated y (B, D), pairs or None): one fused kernel when dt_proj is dense or
    quantized (_dt_weight), which also fills pairs (y in the pair layout) when given; else split +
    norms + dt_proj module + the plain SSM step, and no pairs. block_d: channels per program of the
    quantized-W_dt kernel (default triton_decode.SSM_BLOCK_D). dt_normed: xdbl's dt_r columns are
    already normed (_split_xproj)."""
    w_dt = _dt_weight(m.dt_proj)
    if isinstance(w_dt, torch.Tensor):
        y = ops.mixer_ssm_step(ssm_i, xc, z, xdbl, w_dt, m.dt_proj.bias, m.A_log, m.D, norm_eps,
                               pairs_out=pairs, dt_normed=dt_normed)
        return y, pairs
    if w_dt is not None:  # quantized: the kernel directly (the op's reference twin takes a dense W_dt)
        from falcon_mamba.ops import triton_decode

        y = triton_decode.ssm_step(ssm_i, xc, xdbl[:, :R], m.A_log, xdbl[:, R:R + N], xdbl[:, R + N:], m.D,
                                   z, m.dt_proj.bias, W_dt=w_dt, norm_eps=norm_eps, a_is_log=True,
                                   pairs_out=pairs, block_d=block_d, dt_normed=dt_normed)
        return y, pairs
    dt_r, Bm, Cm = torch.split(xdbl, [R, N, N], dim=-1)
    if norm_eps is not None:
        Bm, Cm = (ops.rms_norm(t, None, norm_eps) for t in (Bm, Cm))
        if not dt_normed:
            dt_r = ops.rms_norm(dt_r, None, norm_eps)
    return ops.ssm_step(ssm_i, xc, m.dt_proj(dt_r), -torch.exp(m.A_log.float()), Bm, Cm, m.D.float(), z,
                        m.dt_proj.bias.float()), None


def split_xproj_supported(model) -> bool:
    """True where the many-row step can run every x_proj by ops/triton_xproj.py: each a bias-free
    dense torch Linear (a quantized one has its own kernel)."""
    from falcon_mamba.ops import triton_xproj

    layers = model.backbone.layers
    return len(layers) > 0 and all(
        type(b.mixer.x_proj) is torch.nn.Linear and b.mixer.x_proj.bias is None
        and triton_xproj.supported(b.mixer.x_proj.weight) for b in layers)


def _split_xproj(m, xc, norm_eps, R: int) -> torch.Tensor:
    """Above DT_PROJ_MAX_BATCH rows: x_proj as split-K partials and their sum with dt_r normed
    (ops/triton_xproj.py; 3 cuBLAS and norm launches become 2)."""
    from falcon_mamba.ops import triton_xproj

    return triton_xproj.xproj_rows(xc, m.x_proj.weight, R, norm_eps)


def conv_fold_supported(model) -> bool:
    """True where the conv-folded GEMV mode applies: every x_proj is a GEMV weight (bias-free dense
    Linear or QuantLinear) and every dt_proj is fusable into the SSM kernel with the conv option
    (_dt_weight: dense, or quantized with its bias outside the forward)."""
    from falcon_mamba.ops.triton_gemv import GemvWeight

    return all(GemvWeight.from_module(b.mixer.x_proj) is not None and _dt_weight(b.mixer.dt_proj) is not None
               for b in model.backbone.layers)


def xproj_merge_supported(model) -> bool:
    """True where the batch-1 GEMV step can run every x_proj inside its layer's in_proj launch
    (triton_gemv_i4.gemv_i4x2's xproj): CUDA, every in_proj on the packed int4 kernel and every
    x_proj an int4 weight that fits it."""
    if model.device.type != "cuda":
        return False
    from falcon_mamba.ops import triton_gemv_i4
    from falcon_mamba.ops.triton_gemv import GemvWeight, default_config, packed_int4

    for b in model.backbone.layers:
        w, xw = GemvWeight.from_module(b.mixer.in_proj), GemvWeight.from_module(b.mixer.x_proj)
        if w is None or not packed_int4(w, model.device):
            return False
        if not triton_gemv_i4.xproj_fits(w, default_config(w, model.device), xw):
            return False
    return True


def _conv_folded(m, ssm_i, conv_i, xz, norm_eps, R: int, N: int, pairs=None) -> torch.Tensor:
    """Batch 1: x_proj with the conv step as its GEMV input, then the fused SSM step that redoes the
    conv for its channels and shifts conv_i (1, K-1, D) in place. xz (1, 2D) -> gated y (1, D);
    pairs (D,): filled with y in the pair layout when given."""
    from falcon_mamba.ops import triton_decode
    from falcon_mamba.ops.triton_gemv import GemvWeight, fused_gemv

    D = xz.shape[1] // 2
    cw, cb = m.conv1d.weight[:, 0], m.conv1d.bias
    xdbl = fused_gemv(GemvWeight.from_module(m.x_proj), xz[0, :D], conv_in=(conv_i[0], cw, cb))[None]
    return triton_decode.ssm_step(ssm_i, xz[:, :D], xdbl[:, :R], m.A_log, xdbl[:, R:R + N], xdbl[:, R + N:],
                                  m.D, xz[:, D:], m.dt_proj.bias, W_dt=_dt_weight(m.dt_proj),
                                  norm_eps=norm_eps, a_is_log=True, conv=(conv_i, cw, cb), pairs_out=pairs)


@torch.no_grad()
def fast_step(model, tokens_B: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor,
              gemv: bool = False, conv_fold: bool = False, xproj_merge: bool = False,
              split_x: bool = False, out_zero_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step with the fused kernels: tokens (B,) -> logits (B, V) fp32.
    conv (nL, B, K-1, D) and ssm (nL, B, D, N) are updated in place (same math as model.step); each
    layer's slice conv[i], ssm[i] must be contiguous (rows of a state pool are). The projections are
    called as modules, so quantized drop-ins work; dt_proj is fused into the SSM kernel when it is a
    dense Linear or a QuantLinear (_dt_weight). gemv: batch-1 in_proj, x_proj, out_proj and lm_head by
    the Triton GEMV instead of cuBLAS. conv_fold: batch 1 with gemv, the conv step folded into x_proj
    and the SSM kernel (_conv_folded; the caller checks conv_fold_supported). xproj_merge: batch 1
    with gemv, x_proj inside the packed int4 in_proj launch (the caller checks
    xproj_merge_supported). out_zero_bias (H,) zeros: above one row, out_proj as F.linear with it as
    bias (cuBLASLt's gemm-and-bias; the mode cublas_lt, which checks that out_proj is a bias-free
    dense Linear). split_x: above DT_PROJ_MAX_BATCH rows, x_proj and dt_r's norm by
    ops/triton_xproj.py (the caller checks split_xproj_supported). decode/modes.py names these
    combinations."""
    ops = _ops()
    c = model.config
    D, R, N = c.intermediate_size, c.time_step_rank, c.state_size
    emb = model.backbone.embeddings
    gather = (type(emb) is torch.nn.Embedding and emb.weight.is_contiguous() and tokens_B.dim() == 1
              and tokens_B.dtype == torch.int64 and tokens_B.is_contiguous()
              and len(model.backbone.layers) > 0)
    # the first norm gathers the token embeddings itself (rows=): one launch fewer per step
    h = emb.weight if gather else emb(tokens_B)
    B = tokens_B.shape[0]
    hbuf = torch.empty(B, c.hidden_size, dtype=torch.float32, device=h.device)  # the fp32 residual stream
    out = None
    norm_eps = c.mixer_rms_eps if c.bcdt_rms else None
    fold = conv_fold and gemv and tokens_B.shape[0] == 1
    from falcon_mamba.ops.triton_decode import DT_PROJ_MAX_BATCH

    split = split_x and tokens_B.shape[0] > DT_PROJ_MAX_BATCH
    if gemv:
        from falcon_mamba.ops.triton_gemv import GemvWeight, fused_gemv
    for i, blk in enumerate(model.backbone.layers):
        m = blk.mixer
        # the packed int4 GEMVs read their input also in a pair layout written by its producer
        pin = _pairs_buffer(m.in_proj, B, blk.norm.weight.dtype, h.device, gemv)
        u = ops.add_rms_norm(h, out, blk.norm.weight, blk.norm.eps, round_to=blk.norm.weight.dtype,
                             h_out=hbuf, pairs_out=pin, rows=tokens_B if gather and i == 0 else None)
        h = hbuf
        xdbl = None
        if pin is not None and not fold:  # packed int4 in_proj: the conv step as its epilogue
            xw = GemvWeight.from_module(m.x_proj) if xproj_merge else None
            r = fused_gemv(GemvWeight.from_module(m.in_proj), u.reshape(-1), x_pairs=pin,
                           conv=(conv[i][0], m.conv1d.weight[:, 0], m.conv1d.bias), xproj=xw)
            xz, xc = r[0][None], r[1][None]
            if xw is not None:  # and x_proj as more programs of that launch
                xdbl = r[2][None]
        else:
            xz = _proj(m.in_proj, u, gemv, pin)
        pout = _pairs_buffer(m.out_proj, xz.shape[0], xz.dtype, xz.device, gemv)
        if fold:
            y = _conv_folded(m, ssm[i], conv[i], xz.contiguous(), norm_eps, R, N, pout)
        else:
            if pin is None:
                xc = ops.conv_step(conv[i], xz[:, :D], m.conv1d.weight[:, 0], m.conv1d.bias)
            if xdbl is None:
                xdbl = _split_xproj(m, xc, norm_eps, R) if split else _proj(m.x_proj, xc, gemv)
            y, pout = _ssm_tail(ops, m, ssm[i], xc, xz[:, D:], xdbl, norm_eps, R, N, pout,
                                XP_SSM_BLOCK_D if xproj_merge else None,
                                dt_normed=split and norm_eps is not None)
        if out_zero_bias is not None and B > 1:
            out = torch.nn.functional.linear(y, m.out_proj.weight, out_zero_bias)
        else:
            out = _proj(m.out_proj, y, gemv, pout)
    norm_f = model.backbone.norm_f
    if gemv and tokens_B.shape[0] == 1:
        from falcon_mamba.ops.triton_gemv import packed_int4  # GemvWeight, fused_gemv: above

        lm = GemvWeight.from_module(model.lm_head)
        if lm is not None and packed_int4(lm, h.device):  # that kernel has no prologue: norm_f apart
            pl = _pairs_buffer(model.lm_head, h.shape[0], model.dtype, h.device, gemv)
            hn = ops.add_rms_norm(h, out, norm_f.weight, norm_f.eps, round_to=None, out_dtype=model.dtype,
                                  pairs_out=pl)
            return fused_gemv(lm, hn.reshape(-1), out_dtype=torch.float32, round_to=model.dtype,
                              x_pairs=pl)[None]
        if lm is not None:  # norm_f as the lm_head GEMV's prologue, fp32 logits (no norm, no cast launch)
            return fused_gemv(lm, h, residual=out, norm_weight=norm_f.weight, eps=norm_f.eps,
                              out_dtype=torch.float32, round_to=model.dtype)[None]
    hn = ops.add_rms_norm(h, out, norm_f.weight, norm_f.eps, round_to=None, out_dtype=model.dtype)
    return _proj(model.lm_head, hn, gemv).float()
