"""Weight-only quantization of the linear layers: int8 per output channel, int4 per group (32/64/128).

    import falcon_mamba as fm
    from falcon_mamba.quant import quantize_model, save_quantized
    model = fm.load_model("folder", dtype="bfloat16")
    quantize_model(model, bits=4, group_size=128)   # in place: in_proj, x_proj, dt_proj, out_proj,
    save_quantized(model, "folder-int4", tokenizer_dir="folder")   # lm_head; the rest stays high precision
    model = fm.load_model("folder-int4", dtype="bfloat16", device="cuda")

formats.py holds the number formats, qlinear.py the drop-in module, triton_qmm.py the GPU kernels,
folder.py the folder format.
"""

from falcon_mamba.quant.folder import (
    FORMAT,
    default_modules,
    is_quantized,
    load_quantized,
    quantizable_modules,
    quantize_model,
    save_quantized,
)
from falcon_mamba.quant.qlinear import QuantLinear

__all__ = ["FORMAT", "QuantLinear", "default_modules", "is_quantized", "load_quantized",
           "quantizable_modules", "quantize_model", "save_quantized"]
