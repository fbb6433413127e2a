"""fxcompress: a torch.fx graph-rewriting compiler for compression-aware training."""
from .compiled import CompressedModel, compile, load_policy  # noqa: F401
from .errors import BadInput, FxcError, PolicyError, RunFailure, TraceError  # noqa: F401
from .quantize import quantize_activations, quantize_weights  # noqa: F401
from .runtime.measure import measure_saved  # noqa: F401

__version__ = "0.1.0"
from . import inspect  # noqa: E402,F401  (fxcompress.inspect: code, diff, table, graph pictures)
