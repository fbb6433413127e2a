"""Symbolic tracing with leaf modules, concrete args and auto-leaf.

When tracing fails inside a submodule, that submodule (the deepest one on
the module stack when the error was raised) becomes a leaf and tracing is
retried; the report lists each automatic leaf with the reason. A failure
that no leaf can fix (in the root module's own forward) is a TraceError
naming the source line and the setting that would help.
"""
from __future__ import annotations

import fnmatch
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import ShapeError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)
MAX_AUTO_LEAVES = 64


@dataclass
class AutoLeaf:
    path: str
    type: str
    reason: str
    where: str  # file:line of the statement that failed


@dataclass
class TraceInfo:
    leaf_modules: List[str] = field(default_factory=list)
    auto_leaves: List[AutoLeaf] = field(default_factory=list)
    attempts: int = 1


class _FailedIn(Exception):
    """Carries the path of the deepest module whose forward raised."""

    def __init__(self, path: str, module_type: str, error: BaseException):
        super().__init__(str(error))
        self.path, self.module_type, self.error = path, module_type, error


class FxcTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[str] = (), auto_paths: Sequence[str] = ()):
        super().__init__()
        self.leaf_patterns = list(leaves)
        self.auto_paths = set(auto_paths)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.auto_paths:
            return True
        for pat in self.leaf_patterns:
            if pat == type(m).__name__ or fnmatch.fnmatchcase(qualname, pat):
                return True
        return super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        if type(root).__name__ == "_CodeOnlyModule":
            # torch.load of a compiled model re-traces its graph module from
            # the generated code, with this tracer: the calls it names into
            # fxcompress.runtime (fxc_save, ...) are imported under other
            # names than the ones torch.fx.wrap registered, so they would be
            # traced through (the compression silently lost); keep them calls
            fn = getattr(type(root), "forward", None)
            for value in getattr(fn, "__globals__", {}).values():
                if callable(value) and str(getattr(value, "__module__", "")).startswith("fxcompress.runtime."):
                    self._autowrap_function_ids.add(id(value))
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except _FailedIn:
            raise
        except Exception as e:  # the first frame to see it is the deepest module
            raise _FailedIn(self.path_of_module(m), type(m).__name__, e) from e


def _user_frame(exc: BaseException) -> str:
    """file:line of the innermost frame outside torch and fxcompress."""
    where = "<unknown>"
    for fr in traceback.extract_tb(exc.__traceback__):
        fn = os.path.abspath(fr.filename)
        if fn.startswith(_TORCH_DIR) or fn.startswith(_OWN_DIR):
            continue
        where = f"{fr.filename}:{fr.lineno}"
    return where


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def trace(model: nn.Module, leaf_modules: Sequence[str] = (), concrete_args: Optional[Dict[str, Any]] = None,
          auto_leaf: bool = True) -> Tuple[fx.GraphModule, TraceInfo]:
    info = TraceInfo(leaf_modules=list(leaf_modules))
    auto: List[str] = []
    while True:
        tracer = FxcTracer(leaf_modules, auto)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args or None)
            break
        except _FailedIn as f:
            err, where = f.error, _user_frame(f.error)
            if not auto_leaf or f.path in auto or len(auto) >= MAX_AUTO_LEAVES:
                raise _trace_error(model, f.path, f.module_type, err, where, auto_leaf) from None
            auto.append(f.path)
            info.auto_leaves.append(AutoLeaf(f.path, f.module_type, _first_line(err), where))
            info.attempts += 1
        except Exception as e:  # raised in the root module's own forward
            raise _trace_error(model, "", type(model).__name__, e, _user_frame(e), auto_leaf) from None
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["fxc_auto_leaves"] = [a.path for a in info.auto_leaves]
    return gm, info


def _trace_error(model, path, mtype, err, where, auto_leaf) -> TraceError:
    if path:
        fix = (f"make it a leaf: add '{path}' (or its type '{mtype}') to trace.leaf_modules in the policy"
               + ("" if auto_leaf else ", or set trace.auto_leaf: true"))
        return TraceError(f"cannot trace module '{path}' ({mtype}) at {where}: {_first_line(err)}; {fix}")
    return TraceError(
        f"cannot trace the model's own forward ({mtype}) at {where}: {_first_line(err)}; "
        "move the data-dependent part into a submodule and list it in trace.leaf_modules, "
        "or fix the input in trace.concrete_args")


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each node's TensorMetadata, like torch's
    ShapeProp, but lets the first failure through untouched (ShapeProp prints
    a traceback of its own) so we can name the node in one line."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            raise _NodeFailed(n, e) from e
        metas = []

        def record(obj):
            if isinstance(obj, torch.Tensor):
                metas.append(_extract_tensor_metadata(obj))
            return obj

        fx.node.map_aggregate(result, record)
        if metas:
            n.meta["tensor_meta"] = metas[0]
        n.meta["type"] = type(result)
        return result


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, error: BaseException):
        super().__init__(str(error))
        self.node, self.error = node, error


# Leaf modules whose output has the input's shape and dtype: on the meta
# device their kernels are slow Python decompositions, and we only need shapes.
_SAME_SHAPE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
               nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
               nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.modules.dropout._DropoutNd)


class _MetaShapeRecorder(_ShapeRecorder):
    """Shape propagation on the meta device: no arithmetic, no memory.

    Parameters and buffers are swapped for meta tensors only for the call
    and put back at once, so the model itself is never modified."""

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if isinstance(mod, _SAME_SHAPE) and args and torch.is_tensor(args[0]) and not kwargs:
            return torch.empty_like(args[0])
        saved = []
        try:
            for m in mod.modules():
                for d in (m._parameters, m._buffers):
                    for k, v in d.items():
                        if v is not None:
                            saved.append((d, k, v))
                            d[k] = v.to("meta")
            return mod(*args, **kwargs)
        finally:
            for d, k, v in saved:
                d[k] = v

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.to("meta") if torch.is_tensor(v) else v


def _to_meta(x):
    return fx.node.map_aggregate(x, lambda t: t.to("meta") if torch.is_tensor(t) else t)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> None:
    """Fill node.meta['tensor_meta'] by running the graph once.

    Runs in eval mode, without grad and with the RNG state restored, so
    BatchNorm statistics and the random stream are what they were: shape
    propagation must not change the model it describes.
    """
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            try:
                _MetaShapeRecorder(gm).run(*_to_meta(tuple(example_inputs)))
            except Exception:
                # Ops without meta kernels, or a real shape error: run for
                # real, which either fills the shapes or names the bad node.
                _ShapeRecorder(gm).run(*example_inputs)
    except (_NodeFailed, TypeError) as f:
        shapes = ", ".join(str(tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__ for t in example_inputs)
        err = f.error if isinstance(f, _NodeFailed) else f
        at = ""
        if isinstance(f, _NodeFailed):
            from .plan import node_qualname

            at = f" at node '{node_qualname(f.node)}'"
            where = _user_frame(err)
            at += f" ({where})" if where != "<unknown>" else ""
        raise ShapeError(f"the example input ({shapes}) does not fit the model{at}: {_first_line(err)}; "
                         "give the right shape with --input-shape or example_inputs()") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
