"""Export glue: a function named by a dotted path in an allow-listed
namespace, both ways (an exported SaveSpec names its function this way;
rebuilding one resolves the name without eval)."""
from __future__ import annotations

import importlib
from typing import Callable

from ..errors import BadInput
from ..kernels.binary_conv import binary_conv2d

# Namespaces a rebuilt spec may take its function from (by dotted path).
_FUNCTION_NAMESPACES = ("torch.nn.functional", "torch", "operator", "math")
# fxcompress's own graph functions, one by one (their modules hold other callables a spec must not name)
_OWN_FUNCTIONS = {"fxcompress.kernels.binary_conv.binary_conv2d": binary_conv2d}


def _namespace(name: str):
    return importlib.import_module(name)


def _function_path(fn: Callable, node: str = "?") -> str:
    """`fn`'s dotted path in an allowed namespace (SaveSpec.fxc_constructor)."""
    name = getattr(fn, "__name__", None)
    own = next((path for path, f in _OWN_FUNCTIONS.items() if f is fn), None)
    if own is not None:
        return own
    for ns_name in _FUNCTION_NAMESPACES:
        ns = _namespace(ns_name)
        if isinstance(name, str) and not name.startswith("_") and getattr(ns, name, None) is fn:
            return f"{ns_name}.{name}"
    for ns_name in _FUNCTION_NAMESPACES:  # exposed under another name
        for attr, value in vars(_namespace(ns_name)).items():
            if value is fn and not attr.startswith("_"):
                return f"{ns_name}.{attr}"
    raise BadInput(f"cannot export the compressed save of node '{node}': its function {fn!r} is not a public "
                   f"function of {', '.join(_FUNCTION_NAMESPACES)}, the only ones an exported SaveSpec may name")


def resolve_function(path: str) -> Callable:
    """The function a dotted path names, from the allow-list only (no eval):
    'torch.nn.functional.conv2d', 'torch.relu', 'operator.add', 'math.sqrt'."""
    if isinstance(path, str) and path in _OWN_FUNCTIONS:
        return _OWN_FUNCTIONS[path]
    ns_name, _, attr = path.rpartition(".") if isinstance(path, str) else ("", "", "")
    if ns_name not in _FUNCTION_NAMESPACES or not attr.isidentifier() or attr.startswith("_"):
        raise BadInput(f"SaveSpec function {path!r} is not allowed: name a public function of "
                       + ", ".join(_FUNCTION_NAMESPACES) + " (e.g. 'torch.nn.functional.conv2d')")
    fn = getattr(_namespace(ns_name), attr, None)
    if fn is None or not callable(fn) or isinstance(fn, type):
        raise BadInput(f"SaveSpec function {path!r} is not a function of {ns_name}")
    return fn
