"""Symbolic tracing with leaf modules, concrete args and auto-leaf.

Forward arguments the example inputs do not supply (`forward(x, mask=None)`
called with x only) are fixed at their defaults (fx concrete_args), as a
call with those inputs would run; `TraceInfo.fixed_args` lists them. Left
symbolic, `if mask is not None` would be traced as taken.

torch.nn modules are leaves by fx's default. Those that hold submodules
(nn.TransformerEncoder and its layers) are traced into, so rules reach
their Linear layers: with PyTorch's attention fast path switched off while
tracing (its eligibility checks branch on the input's rank and masks, which
a symbolic input cannot answer; the traced graph is the path training takes
anyway; `_fast_path_off`). A leaf that still holds
layers (nn.MultiheadAttention, a policy or automatic leaf) is listed in
`TraceInfo.leaf_containers` with what the rules cannot reach inside it.

When tracing fails inside a submodule, that submodule (the deepest one on
the module stack when the error was raised) becomes a leaf and tracing is
retried; the report lists each automatic leaf with the reason. A failure
that no leaf can fix (in the root module's own forward) is a TraceError
naming the source line and the setting that would help.
"""
from __future__ import annotations

import fnmatch
import inspect
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn.modules import transformer

from .errors import ShapeError, TraceError
from .plan import node_qualname

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
class LeafContainer:
    path: str
    type: str
    inner: List[str]  # layers inside it that no rule can reach
    why: str  # why it is a leaf, and how to make it otherwise


@dataclass
class TraceInfo:
    leaf_modules: List[str] = field(default_factory=list)
    auto_leaves: List[AutoLeaf] = field(default_factory=list)
    attempts: int = 1
    fixed_args: Dict[str, Any] = field(default_factory=dict)  # forward args fixed at their defaults
    leaf_containers: List[LeafContainer] = field(default_factory=list)


class _FailedIn(Exception):
    """Carries the path of the deepest module whose forward raised."""

    def __init__(self, path: str, module_type: str, error: BaseException):
        super().__init__(str(error))
        self.path, self.module_type, self.error = path, module_type, error


class _fast_path_off:
    """While tracing: torch.backends.mha's fast path off, and
    transformer._get_seq_len answering None for a symbolic input (it asks
    `src.is_nested`; the length only serves to recognise a causal mask,
    which without it is read from the mask itself). See the module docstring."""

    def __enter__(self):
        self.was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.seq_len = getattr(transformer, "_get_seq_len", None)
        if self.seq_len is not None:
            orig = self.seq_len
            transformer._get_seq_len = lambda src, *a, **k: None if isinstance(src, fx.Proxy) else orig(src, *a, **k)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.was)
        if self.seq_len is not None:
            transformer._get_seq_len = self.seq_len


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
        if _traced_into(m):
            return False
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


# torch.nn modules whose forward is plain module calls and tensor code once
# the fast path is off; nn.MultiheadAttention is not (it branches on its
# inputs' rank and runs its projections inside one functional call).
_TORCH_CONTAINERS = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
                     nn.TransformerDecoderLayer, nn.Transformer)


def _traced_into(m: nn.Module) -> bool:
    return isinstance(m, _TORCH_CONTAINERS)


def _leaf_why(m: nn.Module, path: str, tracer: "FxcTracer") -> str:
    if path in tracer.auto_paths:
        return "an automatic leaf (see auto-leaf); fix the statement it names to trace into it"
    for pat in tracer.leaf_patterns:
        if pat == type(m).__name__ or fnmatch.fnmatchcase(path, pat):
            return f"listed in trace.leaf_modules ({pat!r}); remove it there to trace into it"
    if isinstance(m, nn.MultiheadAttention):
        return ("torch.nn.MultiheadAttention runs its projections inside one functional call and "
                "cannot be traced; rules reach it as a whole (match: {type: MultiheadAttention})")
    return ("a torch.nn module, a leaf by torch.fx's default; rules reach it as a whole "
            f"(match: {{type: {type(m).__name__}}})")


_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention)


def leaf_containers(gm: fx.GraphModule, tracer: "FxcTracer") -> List[LeafContainer]:
    """Leaves (call_module nodes) that hold layers rules cannot reach."""
    out, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        m = gm.get_submodule(node.target)
        inner = [f"{name} ({type(sub).__name__})" for name, sub in m.named_modules()
                 if name and isinstance(sub, _LAYER_TYPES)]
        if isinstance(m, nn.MultiheadAttention):
            inner = ["in_proj_weight (Parameter)"] + inner
        if inner:
            out.append(LeafContainer(node.target, type(m).__name__, inner, _leaf_why(m, node.target, tracer)))
    return out


def _defaults_to_fix(model: nn.Module, n_inputs: Optional[int], given: Dict[str, Any]) -> Dict[str, Any]:
    """forward's parameters after the first n_inputs (all that have a
    default, when n_inputs is None) with a default and not in `given`."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty or p.name in given:
            continue
        if n_inputs is None or i >= n_inputs:
            out[p.name] = p.default
    return out


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
          auto_leaf: bool = True, n_inputs: Optional[int] = None) -> Tuple[fx.GraphModule, TraceInfo]:
    """`n_inputs`: how many positional inputs the example gives (None: not
    known; every argument with a default is then fixed at it)."""
    info = TraceInfo(leaf_modules=list(leaf_modules))
    info.fixed_args = _defaults_to_fix(model, n_inputs, dict(concrete_args or {}))
    concrete = {**info.fixed_args, **dict(concrete_args or {})}
    auto: List[str] = []
    while True:
        tracer = FxcTracer(leaf_modules, auto)
        try:
            with _fast_path_off():
                graph = tracer.trace(model, concrete_args=concrete or None)
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
    info.leaf_containers = leaf_containers(gm, tracer)
    gm.meta["fxc_auto_leaves"] = [a.path for a in info.auto_leaves]
    # where the model's class lives: export rebuilds submodules it cannot
    # construct from a fresh model of this class when no source is given
    gm.meta["fxc_model_class"] = (type(model).__module__, type(model).__qualname__)
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
        # Plain attributes too: an RNN re-reads its weights into
        # `_flat_weights` when it sees them changed, and would keep the meta ones.
        attrs = [(m, dict(m.__dict__)) for m in mod.modules()]
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
            for m, before in attrs:
                for k in [k for k in m.__dict__ if k not in before]:
                    del m.__dict__[k]
                m.__dict__.update(before)

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.to("meta") if torch.is_tensor(v) else v


_SHAPE_WORDS = ("shape", "size", "dimension", "channels", "mat1 and mat2", "expected input", "must match")


def _likely_cause(err: BaseException, gm: fx.GraphModule) -> str:
    """What most likely went wrong, from the error's kind, and the setting
    that fixes it."""
    text = str(err)
    if "NoneType" in text:
        optional = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.args and n.args[0] is None]
        which = f" ({', '.join(optional)} defaults to None)" if optional else ""
        return ("likely cause: a value that is None in this run, such as a forward argument left at its "
                f"default{which}, was traced as a tensor; fix it with trace.concrete_args in the policy "
                "(e.g. {mask: null}) or give it in example_inputs()")
    if isinstance(err, TypeError) and ("argument" in text or "positional" in text):
        return "likely cause: the example inputs are not the arguments forward takes; check example_inputs()"
    if any(w in text.lower() for w in _SHAPE_WORDS):
        return "likely cause: the example input's shape; give the right one with --input-shape or example_inputs()"
    return ("likely cause: an op that fails on the example input (its dtype, device or values); "
            "the node above names where")


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
    except (_NodeFailed, TypeError) as f:  # TypeError: the inputs do not fit forward's signature
        shapes = ", ".join(str(tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__ for t in example_inputs)
        err = f.error if isinstance(f, _NodeFailed) else f
        at = ""
        if isinstance(f, _NodeFailed):
            at = f" at node '{node_qualname(f.node)}'"
            where = _user_frame(err)
            at += f" ({where})" if where != "<unknown>" else ""
        raise ShapeError(f"running the model on the example input ({shapes}) failed{at}: {_first_line(err)}; "
                         + _likely_cause(err, gm)) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
