"""falcon-mamba: an engine for attention-free (Falcon) Mamba language models.

    import falcon_mamba as fm
    model = fm.load_model("folder-or-hub-id", dtype=torch.float32, device="cpu")
    logits, state = model(input_ids)
    fm.save_model(model, "out_folder")
    tok = fm.load_tokenizer("folder-or-hub-id")
    text = fm.generate(model, tok, "prompt", max_new_tokens=64)  # a function; the module's
    # other names (prefill, decode_step, ...): from falcon_mamba.generate import ...
"""

__version__ = "0.1.0"

from falcon_mamba.checkpoint import load_model, save_model
from falcon_mamba.config import PRESETS, ModelConfig, get_preset
from falcon_mamba.errors import UserError
from falcon_mamba.generate import generate
from falcon_mamba.model import FalconMamba
from falcon_mamba.state import State, load_state
from falcon_mamba.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "FalconMamba", "ModelConfig", "PRESETS", "State", "Tokenizer", "UserError", "get_preset",
    "generate", "load_model", "load_state", "load_tokenizer", "save_model",
]
