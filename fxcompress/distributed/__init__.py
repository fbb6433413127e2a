"""Data-parallel training with quantized gradient communication (ALQ/AMQ
and the QSGD / NUQSGD / TernGrad baselines), SPEC section 4.

- `config.CommunicationConfig`: the policy's `communication:` section.
- `quantizers.Quantizer`: one method at one bit width (encode / decode / fit).
- `levels`: the level sets, the variance objective, ALQ and AMQ fitting.
- `wire`: the bit-packed message layout.
- `hook`: the DDP comm hook and its checkpointable state.
- `launch`: spawn N workers (or join torchrun's) and run a training function.

Importing this package imports neither triton nor the DDP machinery.
"""
from .config import METHODS, CommunicationConfig, RefitSchedule  # noqa: F401


def __getattr__(name):
    # heavy parts load on first use so the policy loader stays cheap
    lazy = {
        "Quantizer": ".quantizers", "QuantizedCommState": ".hook", "quantized_hook": ".hook",
        "register": ".hook", "wrap": ".hook", "run_data_parallel": ".launch", "init_from_env": ".launch",
        "under_torchrun": ".launch", "default_backend": ".launch",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name], __name__), name)
    raise AttributeError(name)
