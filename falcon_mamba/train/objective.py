"""The training objective as a module, so that DDP / FSDP2 wrap one thing whose forward returns the
loss: summed next-token cross-entropy over the trained targets of a packed batch.

Two paths with one result. The fused one (the default) asks the model for lm_head's input,
``model.hidden(input_ids, reset_BL=reset)``, and applies the lm_head inside the chunked loss of
linear_ce.py, so no (B, L, V) logits exist. The plain one calls ``model(input_ids, reset_BL=reset)``
(FalconMamba returns ``(logits, state)``, the benchmark's Transformer returns logits) and takes
F.cross_entropy of the fp32 logits: the reference, and the path for models without ``hidden`` or
with an lm_head that is not a dense bias-free Linear (a quantized one). Legend: B rows, L length,
H hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from falcon_mamba.train.linear_ce import linear_cross_entropy


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def fusable(model: nn.Module) -> bool:
    """True when the model can hand its lm_head's input to the fused loss."""
    head = getattr(model, "lm_head", None)
    return (callable(getattr(model, "hidden", None)) and isinstance(head, nn.Linear) and head.bias is None
            and isinstance(head.weight, torch.Tensor))


class LMObjective(nn.Module):
    def __init__(self, model: nn.Module, fused: bool = True, chunk: int = 0):
        """``fused``: the chunked lm_head + loss where the model allows it; ``chunk``: its tokens per
        chunk (0: linear_ce.default_chunk)."""
        super().__init__()
        self.model = model
        self.fused = fused and fusable(model)
        self.chunk = chunk

    def forward(self, input_ids_BL: torch.Tensor, targets_BL: torch.Tensor, reset_BL: torch.Tensor,
                mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """-> the summed loss (fp32 scalar) over targets where mask_BL is True (all when None)."""
        # A batch without document starts needs no resets: the ops can take their plain path.
        reset = reset_BL if bool(reset_BL.any()) else None
        if self.fused:
            h_BLH = _first(self.model.hidden(input_ids_BL, reset_BL=reset))
            return linear_cross_entropy(h_BLH, self.model.lm_head.weight, targets_BL, mask_BL,
                                        chunk=self.chunk)
        logits_BLV = _first(self.model(input_ids_BL, reset_BL=reset))
        nll = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten(), reduction="none")
        if mask_BL is not None:
            nll = nll * mask_BL.flatten().to(nll.dtype)
        return nll.sum()
