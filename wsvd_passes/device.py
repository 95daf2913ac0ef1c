"""Where a model runs and in which floating-point type: the ``--device`` and ``--dtype`` choices.

Model weights, activations and caches follow the model (``--dtype``); statistics, Grams,
gradient reductions, SVDs and fine-tuning masters stay float32/float64 on the model's device.
"""

from __future__ import annotations

import torch

from .errors import WsvdError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_device(name: str | None) -> torch.device:
    """``cuda`` (or ``cuda:N``) or ``cpu``; None picks cuda when CUDA is available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WsvdError(f"--device {name!r} is not a device: use cuda or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise WsvdError(f"--device {name!r} is not supported: use cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WsvdError(f"--device {name}: no CUDA device is available to this torch ({torch.__version__}); "
                        "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise WsvdError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_dtype(name: str, option: str = "--dtype") -> torch.dtype:
    """The dtype named ``name`` (bfloat16, float16 or float32), given with ``option``."""
    if name not in DTYPES:
        raise WsvdError(f"{option} {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]
