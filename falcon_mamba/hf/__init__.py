"""transformers, PEFT and TRL users get falcon-mamba's kernels and file formats.

    from transformers import AutoModelForCausalLM
    import falcon_mamba.hf
    model = falcon_mamba.hf.accelerate(AutoModelForCausalLM.from_pretrained("tiiuae/falcon-mamba-7b"))

- ``accelerate`` (accelerator.py): a transformers FalconMamba / Mamba model's mixers run on our ops;
- ``kernels.py``: our ops under transformers' kernel hook names (mamba_ssm / causal_conv1d signatures);
- ``adapter.py``: PEFT LoRA adapter folders, read (merged into our model) and written.

Importing this package imports neither transformers nor peft; accelerate() imports transformers.
"""

from falcon_mamba.hf.accelerator import accelerate, is_accelerated

__all__ = ["accelerate", "is_accelerated"]
