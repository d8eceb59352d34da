"""The training objective as a module, so that DDP / FSDP2 wrap one thing whose forward returns the
loss: summed next-token cross-entropy over the trained targets of a packed batch.

The inner model is called as ``model(input_ids, reset_BL=reset)``; FalconMamba returns
``(logits, state)``, the benchmark's Transformer returns logits. Legend: B rows, L length, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LMObjective(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids_BL: torch.Tensor, targets_BL: torch.Tensor, reset_BL: torch.Tensor,
                mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """-> the summed loss (fp32 scalar) over targets where mask_BL is True (all when None)."""
        # A batch without document starts needs no resets: the ops can take their plain path.
        out = self.model(input_ids_BL, reset_BL=reset_BL if bool(reset_BL.any()) else None)
        logits_BLV = out[0] if isinstance(out, tuple) else out
        nll = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten(), reduction="none")
        if mask_BL is not None:
            nll = nll * mask_BL.flatten().to(nll.dtype)
        return nll.sum()
