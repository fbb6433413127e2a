"""Find the model and its example inputs from what the user names.

MODEL is a path to a Python file, or `torchvision:NAME` (random weights).
In a file, the model is `--model-fn NAME`, else a `build_model()` function,
else the file's only nn.Module subclass that builds without arguments.
Example inputs come from `--input-shape`, else an `example_inputs()`
function in the file, else a default for torchvision models.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torchvision.models as tvm

from .errors import BadInput, closest

DEFAULT_SHAPES = {"inception_v3": (1, 3, 299, 299)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32}


@dataclass
class LoadedModel:
    model: nn.Module
    source: Dict[str, Any]
    example_inputs_fn: Optional[Callable[[], Any]] = None
    namespace: Dict[str, Any] = field(default_factory=dict, repr=False)


def torchvision_names() -> List[str]:
    return sorted(tvm.list_models(module=tvm))


def build_torchvision(name: str, **extra) -> Tuple[nn.Module, Dict[str, Any]]:
    """A torchvision classification model with random weights, and the
    constructor arguments used (aux heads off: they change the output)."""
    names = torchvision_names()
    if name not in names:
        hint = closest(name, names)
        raise BadInput(f"unknown torchvision classification model '{name}'"
                       + (f" (did you mean '{hint}'?)" if hint else ""))
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    kwargs.update(extra)
    return tvm.get_model(name, weights=None, **kwargs), kwargs


def _load_torchvision(name: str) -> LoadedModel:
    model, kwargs = build_torchvision(name)
    return LoadedModel(model, {"kind": "torchvision", "name": name, "kwargs": kwargs})


def _import_file(path: str):
    if not os.path.isfile(path):
        raise BadInput(f"model file not found: {path}")
    if not path.endswith(".py"):
        raise BadInput(f"model file must be a .py file (or torchvision:NAME), got {path}")
    mod_name = "fxc_user_model_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # so the file can import its neighbours
    try:
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(mod_name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
        where = f"{path}:{frames[-1].lineno}" if frames else path
        if isinstance(e, SyntaxError) and e.lineno:
            where = f"{path}:{e.lineno}"
        raise BadInput(f"{where}: the model file failed to import: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
    return module


def _call(fn: Callable, what: str, path: str):
    try:
        return fn()
    except TypeError as e:
        raise BadInput(f"{path}: {what} must be callable without arguments: {e}") from None
    except Exception as e:
        raise BadInput(f"{path}: {what} raised {type(e).__name__}: {e}") from None


def _load_file(path: str, model_fn: Optional[str]) -> LoadedModel:
    module = _import_file(path)
    ns = vars(module)
    ex = ns.get("example_inputs") if callable(ns.get("example_inputs")) else None
    if model_fn:
        if model_fn not in ns:
            names = [k for k, v in ns.items() if callable(v) and not k.startswith("_")]
            hint = closest(model_fn, names)
            raise BadInput(f"{path}: no function or class named '{model_fn}'"
                           + (f" (did you mean '{hint}'?)" if hint else ""))
        model = _call(ns[model_fn], f"'{model_fn}'", path)
        fn_name = model_fn
    elif callable(ns.get("build_model")):
        model = _call(ns["build_model"], "build_model()", path)
        fn_name = "build_model"
    else:
        classes = [v for v in ns.values() if inspect.isclass(v) and issubclass(v, nn.Module)
                   and v.__module__ == module.__name__ and _no_required_args(v)]
        if len(classes) != 1:
            found = ", ".join(c.__name__ for c in classes) or "none"
            raise BadInput(f"{path}: cannot tell which model to use (nn.Module classes constructible without "
                           f"arguments: {found}); define build_model() or pass --model-fn NAME")
        model = _call(classes[0], f"{classes[0].__name__}()", path)
        fn_name = classes[0].__name__
    if not isinstance(model, nn.Module):
        raise BadInput(f"{path}: '{fn_name}' returned {type(model).__name__}, not an nn.Module")
    return LoadedModel(model, {"kind": "file", "path": os.path.abspath(path), "model_fn": fn_name,
                                "module": module.__name__}, ex, ns)


def _no_required_args(cls) -> bool:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())[1:]
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def load_model(spec: str, model_fn: Optional[str] = None) -> LoadedModel:
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec.split(":", 1)[1])
    return _load_file(spec, model_fn)


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise BadInput(f"--input-shape must be comma-separated integers like 1,3,32,32, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInput(f"--input-shape must be positive integers like 1,3,32,32, got '{text}'")
    return dims


def example_inputs(loaded: LoadedModel, input_shapes: Optional[List[str]] = None,
                   dtype: str = "float32") -> Tuple[Any, ...]:
    """Random example inputs of the given shapes (one per --input-shape)."""
    if dtype not in DTYPES:
        raise BadInput(f"unknown input dtype '{dtype}'; one of {', '.join(DTYPES)}")
    gen = torch.Generator().manual_seed(0)
    if input_shapes:
        shapes = [parse_shape(s) for s in input_shapes]
        dt = DTYPES[dtype]
        if dt.is_floating_point:
            return tuple(torch.randn(s, generator=gen).to(dt) for s in shapes)
        return tuple(torch.randint(0, 2, s, generator=gen, dtype=dt) for s in shapes)
    if loaded.example_inputs_fn is not None:
        out = _call(loaded.example_inputs_fn, "example_inputs()", loaded.source.get("path", "model"))
        return (out,) if torch.is_tensor(out) else tuple(out)
    if loaded.source["kind"] == "torchvision":
        shape = DEFAULT_SHAPES.get(loaded.source["name"], (1, 3, 224, 224))
        return (torch.randn(shape, generator=gen),)
    raise BadInput(f"{loaded.source.get('path')}: no example inputs: pass --input-shape (e.g. 1,3,32,32) "
                   "or define example_inputs() in the file")
