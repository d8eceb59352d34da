"""The (Falcon) Mamba-1 language model in plain PyTorch, module names equal to HF checkpoint keys.

    FalconMamba
      backbone.embeddings            (V, H)
      backbone.layers.{i}.norm       RMSNorm (H) with weight
      backbone.layers.{i}.mixer      in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj
      backbone.norm_f                RMSNorm (H)
      lm_head                        (V, H), shared with the embeddings when tied

Numerics (REFERENCE.md section 10): the residual stream, A, D, the dt bias + softplus and the SSM
state are fp32; each block norm sees the residual rounded to the weight dtype; norm_f sees the
fp32 stream; logits are lm_head(h.to(weight dtype)).float().

Legend: B batch, L length, H hidden, D inner width, N state size, R dt rank, K conv width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from falcon_mamba import ops
from falcon_mamba.config import ModelConfig
from falcon_mamba.state import State

# Parameters kept in fp32 whatever the model dtype: they feed fp32 math and are tiny.
FP32_PARAM_SUFFIXES = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class DtProj(nn.Linear):
    """dt_proj: an nn.Linear whose forward leaves out the bias, which the scan adds in fp32 (as the
    CUDA kernels do). A quantized dt_proj (falcon_mamba.quant) keeps the same contract."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MambaMixer(nn.Module):
    """The selective SSM mixer of one block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H, D, N, R, K = (config.hidden_size, config.intermediate_size, config.state_size,
                         config.time_step_rank, config.conv_kernel)
        self.in_proj = nn.Linear(H, 2 * D, bias=config.use_bias)
        # nn.Conv1d only to hold weight (D, 1, K) and bias (D) under the checkpoint's names.
        self.conv1d = nn.Conv1d(D, D, K, groups=D, padding=K - 1, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        self.dt_proj = DtProj(R, D, bias=True)
        self.A_log = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.empty(D))
        self.out_proj = nn.Linear(D, H, bias=config.use_bias)

    def _ssm_inputs(self, x: torch.Tensor):
        """x (..., D) post-conv -> dt (..., D) without bias, B (..., N), C (..., N)."""
        c = self.config
        dt_r, Bm, Cm = torch.split(self.x_proj(x), [c.time_step_rank, c.state_size, c.state_size], -1)
        if c.bcdt_rms:
            dt_r = ops.rms_norm(dt_r, None, c.mixer_rms_eps)
            Bm = ops.rms_norm(Bm, None, c.mixer_rms_eps)
            Cm = ops.rms_norm(Cm, None, c.mixer_rms_eps)
        dt = self.dt_proj(dt_r)  # without its bias: the scan adds it in fp32
        return dt, Bm, Cm

    def forward(self, u_BLH: torch.Tensor, conv_state: torch.Tensor | None = None,
                ssm_state: torch.Tensor | None = None, reset_BL: torch.Tensor | None = None):
        """u (B, L, H) -> (out (B, L, H), conv state (B, K-1, D), ssm state (B, D, N) fp32).
        reset_BL (B, L) bool, True at the first token of a new document: no state crosses it."""
        if self._fused_training(u_BLH, conv_state, ssm_state):
            from falcon_mamba.ops import mixer_autograd  # Triton: imported only where it runs

            return mixer_autograd.mixer_forward(self, u_BLH, reset_BL)
        # Only pass reset_BL when given, so backends without document resets still serve inference.
        kw = {} if reset_BL is None else {"reset_BL": reset_BL}
        x, z = self.in_proj(u_BLH).chunk(2, dim=-1)
        x, conv_state = ops.causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state, **kw)
        dt, Bm, Cm = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ops.selective_scan(x, dt, A, Bm, Cm, self.D.float(), z,
                                          self.dt_proj.bias.float(), ssm_state, **kw)
        return self.out_proj(y), conv_state, ssm_state

    def _fused_training(self, u_BLH: torch.Tensor, conv_state, ssm_state) -> bool:
        """Whether forward runs as one autograd Function (ops/mixer_autograd.py: saves u, xz, x_proj's
        output and the scan's states; recomputes the rest in the backward): training (autograd on,
        no carried state) on the triton backend, with plain projections. A LoRA parametrization or
        a quantized layer changes a projection's type: those keep the op-by-op path."""
        if conv_state is not None or ssm_state is not None or not torch.is_grad_enabled():
            return False
        if not (u_BLH.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        if not (type(self.in_proj) is type(self.x_proj) is type(self.out_proj) is nn.Linear
                and type(self.dt_proj) is DtProj and type(self.conv1d) is nn.Conv1d):
            return False
        return ops.backend_name(u_BLH.device) == "triton"

    def step(self, u_BH: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token: u (B, H) -> out (B, H); conv_state and ssm_state are updated in place."""
        x, z = self.in_proj(u_BH).chunk(2, dim=-1)
        x = ops.conv_step(conv_state, x, self.conv1d.weight[:, 0], self.conv1d.bias)
        dt, Bm, Cm = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y = ops.ssm_step(ssm_state, x, dt, A, Bm, Cm, self.D.float(), z, self.dt_proj.bias.float())
        return self.out_proj(y)


def joint_add_norm(h, out, weight, eps, u_dtype):
    """(h + out, rms_norm(h + out, weight) in u_dtype) as one autograd Function of Triton kernels
    (norm_autograd.add_rms_norm): FalconMamba's training add + block norm (where _train_add_norm)."""
    from falcon_mamba.ops import norm_autograd, triton_backend  # Triton: imported only where it runs

    return norm_autograd.add_rms_norm(h, out, weight, eps, u_dtype, triton_backend.add_rms_norm,
                                      triton_backend.rms_norm_backward)


class MambaBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = MambaMixer(config)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class FalconMamba(nn.Module):
    """The causal LM. ``forward(input_ids, state=None) -> (logits, state)``; ``hidden`` -> (lm_head's
    input, state), for losses that apply the lm_head themselves."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    # ---- initialisation (as mamba_ssm / HF do it) -----------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        c = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02, generator=generator)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02, generator=generator)
        for blk in self.backbone.layers:
            m = blk.mixer
            blk.norm.weight.fill_(1.0)
            for lin in (m.in_proj, m.x_proj, m.out_proj):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
                if lin.bias is not None:
                    lin.bias.zero_()
            nn.init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5), generator=generator)
            if m.conv1d.bias is not None:
                m.conv1d.bias.zero_()
            # GPT-2 style: scale the residual-branch output by 1/sqrt(n_layers).
            m.out_proj.weight /= math.sqrt(c.num_hidden_layers)
            std = c.time_step_rank ** -0.5 * c.time_step_scale
            nn.init.uniform_(m.dt_proj.weight, -std, std, generator=generator)
            # dt bias = inverse softplus of dt drawn log-uniformly in [dt_min, dt_max].
            u = torch.rand(c.intermediate_size, generator=generator)
            dt = torch.exp(u * (math.log(c.time_step_max) - math.log(c.time_step_min))
                           + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, c.state_size + 1, dtype=torch.float32).expand(c.intermediate_size, -1)
            m.A_log.copy_(torch.log(A))
            m.D.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)

    def to_dtype(self, dtype: torch.dtype) -> FalconMamba:
        """Cast weights to dtype, keeping A_log, D and the dt bias in fp32."""
        for name, p in self.named_parameters():
            want = torch.float32 if name.endswith(FP32_PARAM_SUFFIXES) else dtype
            if p.dtype != want:
                p.data = p.data.to(want)
        return self

    # ---- forward ----------------------------------------------------------------------------
    def new_state(self, batch_size: int) -> State:
        return State.zeros(self.config, batch_size, self.dtype, self.device)

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        """The fp32 residual stream (..., H) -> norm_f's output in the model dtype: lm_head's input."""
        # self.dtype, not lm_head.weight.dtype: a quantized lm_head has no dense weight.
        return self.backbone.norm_f(h).to(self.dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._final(h)).float()

    def _fused_add_norm(self):
        """The Triton backend module when the residual add + block norm can be one kernel (CUDA,
        triton backend, no autograd through it), else None."""
        if self.device.type != "cuda" or (torch.is_grad_enabled() and any(
                p.requires_grad for p in self.parameters())):
            return None
        from falcon_mamba import ops

        if ops.backend_name(self.device) != "triton":
            return None
        from falcon_mamba.ops import triton_backend

        return triton_backend

    def _train_add_norm(self, state: State | None) -> bool:
        """Whether the training residual adds and block norms run as joint_add_norm (one autograd
        Function of Triton kernels): training on the triton backend (CUDA, autograd on, no carried
        state)."""
        if state is not None or self.device.type != "cuda" or not torch.is_grad_enabled():
            return False
        from falcon_mamba import ops

        return ops.backend_name(self.device) == "triton"

    def forward(self, input_ids: torch.Tensor, state: State | None = None,
                last_only: bool = False, reset_BL: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """input_ids (B, L) int64 -> logits (B, L, V) fp32 (or (B, 1, V) with last_only) and the
        state after the last token. ``state`` (from a previous call) is read, not modified.
        ``reset_BL`` (B, L) bool marks the first token of each new document in packed sequences
        (training): the state is dropped there, so no information crosses a document boundary."""
        h, new_state = self._backbone(input_ids, state, reset_BL)
        if last_only:
            h = h[:, -1:]
        return self._head(h), new_state

    def hidden(self, input_ids: torch.Tensor, state: State | None = None,
               reset_BL: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """As forward, but -> lm_head's input (B, L, H) in the model dtype instead of the logits, so
        that a loss can apply the lm_head itself (train/linear_ce.py) without (B, L, V) logits:
        ``forward(ids)[0] == lm_head(hidden(ids)[0]).float()``."""
        h, new_state = self._backbone(input_ids, state, reset_BL)
        return self._final(h), new_state

    def _backbone(self, input_ids: torch.Tensor, state: State | None,
                  reset_BL: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        """input_ids (B, L) -> the residual stream after the last block (B, L, H) fp32, and the state."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        h = self.backbone.embeddings(input_ids)
        convs, ssms = [], []
        fused = self._fused_add_norm()
        train = not fused and self._train_add_norm(state)
        layers = self.backbone.layers
        # joint[i]: block i's norm takes the previous block's residual add with it (training, fp32
        # norm weights: the recipe's; a bf16 norm rounds its input first, the separate path below)
        joint = [train and i > 0 and blk.norm.weight.dtype == torch.float32
                 for i, blk in enumerate(layers)] + [False]
        dev = h.device.type  # the joint norm's output dtype: what the mixer casts its input to
        u_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        hbuf = out = None
        for i, blk in enumerate(layers):
            if fused:  # one kernel for the residual add, the cast and the norm (same rounding)
                if hbuf is None:
                    hbuf = torch.empty(h.shape, dtype=torch.float32, device=h.device)
                u = fused.add_rms_norm(h, out, blk.norm.weight, blk.norm.eps,
                                       round_to=blk.norm.weight.dtype, h_out=hbuf)
                h = hbuf
            elif joint[i]:  # training: the residual add and the norm as one Function
                h, u = joint_add_norm(h.float(), out, blk.norm.weight, blk.norm.eps, u_dtype)
            else:
                u = blk.norm(h.to(blk.norm.weight.dtype))
            out, conv, ssm = blk.mixer(u, None if state is None else state.conv[i],
                                       None if state is None else state.ssm[i], reset_BL)
            if not fused and not joint[i + 1]:  # (else the next block's add + norm adds it)
                h = h.float() + out
            convs.append(conv)
            ssms.append(ssm)
        if fused and out is not None:
            h = h + out  # the last layer's residual add
        seen = (0 if state is None else state.tokens_seen) + input_ids.shape[1]
        return h, State(self.config, torch.stack(convs), torch.stack(ssms), seen)

    @torch.no_grad()
    def step(self, token_ids_B: torch.Tensor, state: State) -> torch.Tensor:
        """Decode one token per row: token ids (B,) -> logits (B, V) fp32. Updates state IN PLACE,
        so each token costs the same time and memory whatever the context length."""
        h = self.backbone.embeddings(token_ids_B)
        for i, blk in enumerate(self.backbone.layers):
            u = blk.norm(h.to(blk.norm.weight.dtype))
            h = h.float() + blk.mixer.step(u, state.conv[i], state.ssm[i])
        state.tokens_seen += 1
        return self._head(h)
