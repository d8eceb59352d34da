"""``accelerate(model)``: a transformers FalconMamba / Mamba model runs its mixers on our ops.

    from transformers import AutoModelForCausalLM
    import falcon_mamba.hf
    model = falcon_mamba.hf.accelerate(AutoModelForCausalLM.from_pretrained("tiiuae/falcon-mamba-7b"))

The model object, its weights, its cache and everything around it (generate, Trainer, PEFT) stay
transformers'; only where its mixers compute changes, and not what they compute.

How, and why this way. transformers 5.x routes a mixer's conv and scan through five module-level
functions, its kernel hook points (``use_kernel_func_from_hub_with_fallback``: causal_conv1d_fn,
causal_conv1d_update, selective_scan_fn, selective_state_update, mamba_inner_fn; see
``falcon_mamba.hf.kernels``), and the mixer's forward looks them up in its module when it runs, on
every device: there is no separate CPU path any more. Those hook points are where our ops go in.
Two parts of transformers' own mechanism do not fit:
- the hook resolves its implementation when the modeling module is imported (the mamba_ssm /
  causal_conv1d package if importable, else torch), so a model already loaded cannot be given
  another one through it;
- the ``kernels`` Hub mapping (``kernelize`` with ``use_kernel_mapping``) loads compiled kernel
  repositories from the Hub or a local kernel build, not Python functions, and transformers 5.24
  accepts only kernels >= 0.18.2, which the package index here does not have (0.17.2).
So ``accelerate`` puts a small dispatcher at each hook name of the modeling module (once per
process): it calls our function while an accelerated mixer is running (a context variable set by
forward pre/post hooks on that mixer instance) and the function that was there before otherwise.
Models that were not accelerated, in the same process, compute exactly as before.

A decode step (one new token per row, continuing transformers' cache) does not go through the
hook points: transformers' mixer code between them costs ~25 small launches and their Python per
layer, more than the GPU work. The mixer's forward (on the instance) sends it to
``falcon_mamba.hf.decode.mixer_decode`` instead, five launches on the cache's own tensors; every
other call (prefill, training, the CPU) runs transformers' forward with the hooks above.

The RMSNorms (block norms, norm_f and Falcon Mamba's weightless B/C/dt norms) get our
``ops.rms_norm`` as their forward, on the instance: the same formula (HF's order of rounding), one
Triton kernel instead of six elementwise ones on CUDA when no gradient is needed (decode).
transformers marks the block norm as a kernel layer ("RMSNorm", ``use_kernel_forward_from_hub``),
whose mechanism is the same thing, replacing forward.

What runs where: Triton on CUDA, the chunked torch scan on the CPU (``falcon_mamba.ops`` chooses by
device; ``falcon_mamba.ops.set_backend`` overrides). Forward, backward (our ops are differentiable;
transformers' training path calls mamba_inner_fn first, which returns None here, so training runs
the same conv + scan as inference) and ``generate`` with transformers' cache (prefill through the
scan, which hands the cache its fp32 final state; single-token steps through the step ops).

Tested with transformers 5.24.0 and 5.25.0 (CPU) and 5.17.0 (the GPU image), torch 2.11-2.14,
without the ``kernels`` package; the dispatchers wrap whatever those names held, so with mamba_ssm
installed a model that is not accelerated still uses mamba_ssm. 5.25 moved FalconMamba's conv and
scan into the module functions causal_conv1d_forward and mamba_scan_forward (which call the same
four hook points) and dropped its mamba_inner_fn; its decode step counts each token in the cache
(``increase_count``), which the decode path here does too. Other transformers versions that have
the same hook names work the same way; older ones (4.x, where the mixer calls mamba_ssm directly
from cuda_kernels_forward) are refused with a UserError that names the versions to install.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import types

import torch.nn as nn

from falcon_mamba import ops
from falcon_mamba.errors import UserError
from falcon_mamba.hf import decode, kernels

TESTED_TRANSFORMERS = ("5.17.0", "5.24.0", "5.25.0")

# > 0 while an accelerated mixer's forward runs in this thread / task.
_ACTIVE: contextvars.ContextVar[int] = contextvars.ContextVar("falcon_mamba_hf_active", default=0)
_MARK = "_falcon_mamba_accelerated"


def _modeling_modules() -> list[types.ModuleType]:
    try:
        from transformers.models.falcon_mamba import modeling_falcon_mamba
        from transformers.models.mamba import modeling_mamba
    except ImportError as e:
        raise UserError(f"falcon_mamba.hf needs transformers (pip install transformers): {e}") from None
    return [modeling_falcon_mamba, modeling_mamba]


def _install_dispatchers(module: types.ModuleType) -> None:
    """Put a dispatcher at each hook name of a modeling module (idempotent)."""
    import transformers

    missing = [name for name in kernels.HOOKS if not callable(getattr(module, name, None))]
    if missing:
        raise UserError(
            f"transformers {transformers.__version__} has no kernel hook {', '.join(missing)} in "
            f"{module.__name__}; falcon_mamba.hf.accelerate needs transformers 5.17-5.25 (tested: "
            f"{', '.join(TESTED_TRANSFORMERS)}): pip install 'transformers>=5.17,<5.26'")
    hooks = {**kernels.HOOKS, **{n: f for n, f in kernels.OPTIONAL_HOOKS.items()
                                 if callable(getattr(module, n, None))}}
    for name, ours in hooks.items():
        theirs = getattr(module, name)
        if getattr(theirs, _MARK, False):
            continue

        def dispatch(*args, _ours=ours, _theirs=theirs, **kwargs):
            return (_ours if _ACTIVE.get() else _theirs)(*args, **kwargs)

        functools.update_wrapper(dispatch, theirs)
        setattr(dispatch, _MARK, True)
        setattr(module, name, dispatch)


def _enter(module, args):
    _ACTIVE.set(_ACTIVE.get() + 1)


def _leave(module, args, output):
    _ACTIVE.set(_ACTIVE.get() - 1)


def _norm_forward(self, x):
    return ops.rms_norm(x, self.weight, self.variance_epsilon)


def _weightless_norm_forward(self, x):
    # the epsilon's attribute: eps up to 5.24, variance_epsilon from 5.25
    return ops.rms_norm(x, None, self.eps if hasattr(self, "eps") else self.variance_epsilon)


def _mixer_forward(self, hidden_states, *args, **kwargs):
    found = decode.decode_states(self, hidden_states, args, kwargs)
    if found is None:
        return self._falcon_mamba_theirs(hidden_states, *args, **kwargs)
    conv, ssm, mask, cache = found
    mask_fn = getattr(sys.modules[type(self).__module__], "apply_mask_to_padding_states", None)
    out = decode.mixer_decode(self, hidden_states, conv, ssm, mask, mask_fn)
    decode.count_token(cache, self.layer_idx)
    return out


def _set_forward(module: nn.Module, fn) -> None:
    """Replace forward on this instance; under accelerate's device hooks (which wrap forward and
    keep the original as _old_forward) replace the wrapped one, so the hooks still fire. The one
    replaced stays reachable as module._falcon_mamba_theirs."""
    bound = types.MethodType(fn, module)
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        module._falcon_mamba_theirs = module._old_forward
        module._old_forward = bound
    else:
        module._falcon_mamba_theirs = module.forward
        module.forward = bound


def accelerate(model: nn.Module) -> nn.Module:
    """Make every FalconMamba / Mamba mixer and RMSNorm in ``model`` run on falcon_mamba's ops.

    model: a transformers FalconMambaForCausalLM or MambaForCausalLM (or its backbone, or a PEFT
    model wrapping one), on any device and dtype. Changed in place and returned; calling it again
    is a no-op. Weights, outputs (to floating-point rounding) and state dict are unchanged.
    """
    mods = _modeling_modules()
    fm_mod, mamba_mod = mods
    mixer_types = (fm_mod.FalconMambaMixer, mamba_mod.MambaMixer)
    norm_types = (fm_mod.FalconMambaRMSNorm, mamba_mod.MambaRMSNorm)
    weightless = getattr(fm_mod, "FalconMambaWeightlessRMSNorm", None)
    mixers = [m for m in model.modules() if isinstance(m, mixer_types)]
    if not mixers:
        raise UserError(f"falcon_mamba.hf.accelerate takes a transformers FalconMambaForCausalLM or "
                        f"MambaForCausalLM; {type(model).__name__} has no FalconMamba/Mamba mixer")
    for m in mixers:
        kernels._silu(m.activation)  # an activation our conv lacks is refused now, not mid-forward
        ops.backend_name(m.x_proj.weight.device)  # a forced backend that cannot run here, likewise
    for mod in mods:
        _install_dispatchers(mod)
    for m in mixers:
        if getattr(m, _MARK, False):
            continue
        m.register_forward_pre_hook(_enter)
        m.register_forward_hook(_leave, always_call=True)  # also when forward raises
        _set_forward(m, _mixer_forward)
        setattr(m, _MARK, True)
    for m in model.modules():
        if getattr(m, _MARK, False):
            continue
        if isinstance(m, norm_types):
            _set_forward(m, _norm_forward)
            setattr(m, _MARK, True)
        elif weightless is not None and isinstance(m, weightless):
            _set_forward(m, _weightless_norm_forward)
            setattr(m, _MARK, True)
    return model


def is_accelerated(model: nn.Module) -> bool:
    """True when every mixer of ``model`` has been accelerated."""
    mixers = [m for m in model.modules() if type(m).__name__ in ("FalconMambaMixer", "MambaMixer")]
    return bool(mixers) and all(getattr(m, _MARK, False) for m in mixers)
