"""`falcon-mamba info`: versions, device, op backend, and a model's config and size."""

from __future__ import annotations

import json
import platform

NAME = "info"
HELP = "print versions, device, op backend and the model's config and parameter count"


def add_arguments(p) -> None:
    p.add_argument("--model", help="model folder or Hub id (default: the small model embedded in the "
                                   "package, when this install has it); checked as loading would check "
                                   "it (config, weight files, every tensor's name and shape): exit 2 if it "
                                   "cannot load")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import torch

    import falcon_mamba
    from falcon_mamba import default_model, ops
    from falcon_mamba.dtypes import parse_device

    device = str(parse_device(args.device))
    info = {
        "falcon_mamba": falcon_mamba.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "op_backend": ops.backend_name(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # info is a diagnostic: an install without the embedded model still prints the rest
    ref = args.model or (default_model.path() if default_model.available() else None)
    if ref is not None:
        from falcon_mamba.checkpoint import check_folder

        # Everything loading checks but the weights' data: a folder nothing can load is an error.
        folder, cfg = check_folder(ref)
        info["model"] = str(folder)
        info["config"] = cfg.to_hf_dict()
        info["parameters"] = cfg.num_parameters
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "config":
            print("config:")
            for ck, cv in v.items():
                print(f"  {ck}: {cv}")
        elif k == "parameters":
            print(f"parameters: {v:,}")
        else:
            print(f"{k}: {v}")
    return 0
