"""Write a CompressedModel out as files that need no fxcompress compile to use.

`export(cm, directory, source)` writes

- `module.py`: importable Python. A class `CompressedModule` whose forward is
  the rewritten graph's code, an `__init__` that rebuilds the module
  hierarchy the code refers to, and `load(directory=None)` that builds it and
  loads the weights (strict, `weights_only=True`).
- `weights.pt` (and `weights.safetensors` when safetensors is installed).
- `report.json`: `cm.report()` (plan, leaves, pass notes) and the source.
- `graph.dot`, `graph.png` (networkx + matplotlib) and `graph.svg` when
  Graphviz `dot` is installed.

How a submodule is rebuilt, first that works:

1. `module.fxc_constructor()` when the module defines it. It returns
   `(callable, args, kwargs)` with plain-literal arguments; fxcompress
   runtime modules define it because their state is not all in attributes.
2. Its class called with arguments read back from same-named attributes
   (`Conv2d(in_channels=3, ...)`), as PyTorch's own modules store them.
3. The submodule at the same path in a freshly built source model
   (`source={"kind": "torchvision", "name": ..., "kwargs": {...}}` or
   `{"kind": "file", "path": ..., "model_fn": ...}`; the file is copied
   beside module.py as `source_model.py`).

Each candidate is built here and compared with the original (type, every
parameter and buffer's name, shape and dtype, non-persistent buffer values,
repr) before it is written, and the finished module.py is imported and
loaded once before `export` returns, so a bad export fails here, not later.

What is written is the graph module, not the CompressedModel around it:
controllers (`cm.controllers`) are not exported. A model compiled with the
activations pass keeps its compressed saves (each SaveSpec is rebuilt by
`rebuild_save_spec`, the specs of one instance sharing one Ledger), but an
AutoQuant (`mode: auto`) model has no AutoQuantController once exported: it
trains with the fallback `bits` of its policy everywhere, never with
per-channel widths from the bound.
"""
from __future__ import annotations

import builtins
import dataclasses
import enum
import importlib
import importlib.util
import inspect as pyinspect
import json
import math
import os
import re
import shutil
import sys
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torchvision.models as tvm

from .errors import BadInput, RunFailure
from .inspect import write_graph
from .loading import load_model

CLASS_NAME = "CompressedModule"
SOURCE_COPY = "source_model.py"

# Containers are rebuilt empty and filled child by child: GraphModule makes
# plain nn.Module parents for the paths its code uses, and the torch
# containers take their children positionally, not from attributes.
_CONTAINERS = {nn.Module: "torch.nn.Module()", nn.Sequential: "torch.nn.Sequential()",
               nn.ModuleList: "torch.nn.ModuleList()", nn.ModuleDict: "torch.nn.ModuleDict()"}


class _NoExpr(Exception):
    """This value or object cannot be written as Python source."""


# --- Python source for values and objects ----------------------------------

def literal(value: Any) -> str:
    """Python source that evaluates to `value` (plain data only)."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f'float("{value}")'
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, tuple):
        items = ", ".join(literal(v) for v in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return "{" + ", ".join(f"{k!r}: {literal(v)}" for k, v in value.items()) + "}"
    raise _NoExpr(f"{type(value).__name__} value is not a plain literal")


def _resolve(root: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        root = getattr(root, part)
    return root


def _file_of(module_name: str) -> Optional[str]:
    mod = sys.modules.get(module_name)
    f = getattr(mod, "__file__", None)
    return os.path.abspath(f) if f else None


class _Refs:
    """Turns classes and functions into source expressions plus the import
    lines they need. Objects defined in the user's model file resolve
    through the copy of that file (`_source`), since the file's module name
    (fxc_user_model_*) is not importable elsewhere."""

    def __init__(self, source_file: Optional[str]):
        self.source_file = os.path.abspath(source_file) if source_file else None
        self.imports: Dict[str, None] = {}  # ordered set of import lines
        self.uses_source = False
        # submodules of the exported graph module, by id: a constructor
        # argument that is one of them (a group of modules) is written as a
        # reference to the already rebuilt one, `self.get_submodule(path)`
        self.module_paths: Dict[int, str] = {}

    def ref(self, obj: Any, need: Dict[str, None]) -> str:
        """An expression for `obj`; the import line it needs goes into `need`
        (kept only if the caller commits it: a rejected candidate's imports
        must not reach module.py)."""
        mod = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if not mod or not qualname or "<locals>" in qualname:
            raise _NoExpr(f"{obj!r} is not defined at module level")
        if self.source_file and _file_of(mod) == self.source_file:
            need["#source"] = None
            return f"_source.{qualname}"
        parts = mod.split(".")
        # The shortest importable parent that exposes the object reads best:
        # torch.nn.Conv2d rather than torch.nn.modules.conv.Conv2d.
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            if cand.split(".")[-1].startswith("_") and i < len(parts):
                continue
            try:
                found = _resolve(importlib.import_module(cand), qualname)
            except Exception:
                continue
            if found is obj:
                need[f"import {cand}"] = None
                return f"{cand}.{qualname}"
        raise _NoExpr(f"{mod}.{qualname} cannot be imported by that name")

    def commit(self, need: Dict[str, None]) -> None:
        for line in need:
            if line == "#source":
                self.uses_source = True
            else:
                self.imports[line] = None


def _global_lines(globals_: Dict[str, Any], src: str, refs: _Refs) -> List[str]:
    """Statements that define every global name the forward code uses."""
    lines = []
    for name, obj in globals_.items():
        # fx lists a few names (inf, device, pytree, ...) for every graph
        if getattr(builtins, name, None) is obj or not re.search(rf"\b{re.escape(name)}\b", src):
            continue
        if isinstance(obj, float):
            lines.append(f"{name} = {literal(obj)}")
        elif obj is type(None):
            lines.append(f"{name} = type(None)")
        elif pyinspect.ismodule(obj):
            line = f"import {obj.__name__}" if obj.__name__ == name else f"import {obj.__name__} as {name}"
            refs.imports[line] = None
        elif hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
            need: Dict[str, None] = {}
            try:
                expr = refs.ref(obj, need)
            except _NoExpr as e:
                raise BadInput(f"cannot export: the rewritten code calls '{name}', but {e}; "
                               "define it at module level in an importable module") from None
            mod, _, attr = expr.rpartition(".")
            if mod and not expr.startswith("_source.") and "." not in obj.__qualname__:
                refs.imports[f"from {mod} import {attr}" + ("" if attr == name else f" as {name}")] = None
            else:
                refs.commit(need)
                if expr != name:
                    lines.append(f"{name} = {expr}")
        else:
            try:
                lines.append(f"{name} = {literal(obj)}")
            except _NoExpr:
                raise BadInput(f"cannot export: the rewritten code uses the global '{name}' "
                               f"({type(obj).__name__}), which cannot be written as Python source") from None
    return lines


# --- checking a rebuilt submodule against the original ----------------------

def _tensors(m: nn.Module) -> Dict[str, torch.Tensor]:
    out = dict(m.named_parameters(remove_duplicate=False))
    out.update(m.named_buffers(remove_duplicate=False))
    return out


_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_is_full_backward_hook"}


def _values_equal(a: Any, b: Any, depth: int = 0) -> bool:
    if isinstance(a, weakref.ref) and isinstance(b, weakref.ref):
        a, b = a(), b()  # RNNs keep weak references to their own weights
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype
    if isinstance(a, (list, tuple)) and len(a) == len(b) and depth < 4:
        if all(_values_equal(x, y, depth + 1) for x, y in zip(a, b)):
            return True
    try:
        if bool(a == b):
            return True
    except Exception:
        pass
    # plain objects without __eq__ (configs, small holders): compare their fields
    if depth < 2 and hasattr(a, "__dict__") and not callable(a):
        va, vb = vars(a), vars(b)
        return va.keys() == vb.keys() and all(_values_equal(va[k], vb[k], depth + 1) for k in va)
    return False


def _attribute_mismatch(original: nn.Module, rebuilt: nn.Module) -> Optional[str]:
    """Plain attributes (config the forward reads, held objects) must match
    too: repr and tensors do not show a callable kept in `self._fn`."""
    for prefix, m in original.named_modules():
        other = rebuilt.get_submodule(prefix) if prefix else rebuilt
        mine, theirs = vars(m), vars(other)
        for key, value in mine.items():
            if key in _MODULE_INTERNALS:
                continue
            where = f"{prefix}.{key}" if prefix else key
            if key not in theirs:
                return f"attribute {where} is missing"
            if not _values_equal(value, theirs[key]):
                return f"attribute {where} is {_short_repr(theirs[key])}, not {_short_repr(value)}"
    return None


def _short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _mismatch(original: nn.Module, rebuilt: Any, attributes: bool = True) -> Optional[str]:
    """Why `rebuilt` is not a faithful fresh copy of `original` (None: it is).

    `attributes=False` trusts the module's own fxc_constructor() about its
    plain attributes, which may be training-time state."""
    if type(rebuilt) is not type(original):
        return f"built a {type(rebuilt).__name__}, not a {type(original).__name__}"
    a, b = _tensors(original), _tensors(rebuilt)
    if set(a) != set(b):
        extra, missing = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        return f"tensors differ (extra {extra[:3]}, missing {missing[:3]})"
    for k, t in a.items():
        if tuple(t.shape) != tuple(b[k].shape) or t.dtype != b[k].dtype:
            return f"{k}: {tuple(b[k].shape)} {b[k].dtype} instead of {tuple(t.shape)} {t.dtype}"
    # Non-persistent buffers' values need not match: the writer carries them
    # in the weights file (_Writer._carry_non_persistent).
    if repr(rebuilt) != repr(original):
        return "repr differs"
    return _attribute_mismatch(original, rebuilt) if attributes else None


def _common_float_dtype(m: nn.Module) -> Optional[torch.dtype]:
    dtypes = {t.dtype for t in _tensors(m).values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


# --- constructor candidates -------------------------------------------------

def _arg(value: Any, refs: _Refs, need) -> str:
    """Source for a constructor argument: a literal, a dataclass instance, an
    enum member, or a module-level class or function."""
    try:
        return literal(value)
    except _NoExpr:
        pass
    if isinstance(value, enum.Enum):
        return f"{refs.ref(type(value), need)}.{value.name}"
    if isinstance(value, nn.Module):
        path = refs.module_paths.get(id(value))
        if path is None:
            raise _NoExpr(f"a {type(value).__name__} argument that is not a submodule of the model")
        return f"self.get_submodule({path!r})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f"{f.name}={_arg(getattr(value, f.name), refs, need)}"
                  for f in dataclasses.fields(value) if f.init]
        return f"{refs.ref(type(value), need)}({', '.join(fields)})"
    if isinstance(value, tuple):
        items = [_arg(v, refs, need) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return "[" + ", ".join(_arg(v, refs, need) for v in value) + "]"
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return "{" + ", ".join(f"{k!r}: {_arg(v, refs, need)}" for k, v in value.items()) + "}"
    if callable(value):
        return refs.ref(value, need)
    raise _NoExpr(f"a {type(value).__name__} cannot be written as Python source")


def _from_fxc_constructor(m: nn.Module, refs: _Refs, need) -> str:
    made = m.fxc_constructor()
    if not (isinstance(made, tuple) and len(made) == 3):
        raise _NoExpr("fxc_constructor() must return (callable, args, kwargs)")
    fn, args, kwargs = made
    parts = [_arg(a, refs, need) for a in args] + [f"{k}={_arg(v, refs, need)}" for k, v in kwargs.items()]
    return f"{refs.ref(fn, need)}({', '.join(parts)})"


def _from_attributes(m: nn.Module, refs: _Refs, need) -> str:
    cls = type(m)
    try:
        params = list(pyinspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        raise _NoExpr(f"{cls.__name__}.__init__ has no readable signature") from None
    args = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        has_default = p.default is not p.empty
        if not hasattr(m, p.name):
            if has_default:
                continue
            raise _NoExpr(f"required argument '{p.name}' is not stored as an attribute")
        value = getattr(m, p.name)
        # `bias=True` is stored as the bias Parameter itself (or None).
        if isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        try:
            text = _arg(value, refs, need)
        except _NoExpr:
            if has_default:
                continue  # the check below tells whether the default was right
            raise _NoExpr(f"argument '{p.name}' is a {type(value).__name__}, "
                          "which cannot be written as Python source") from None
        if has_default and _same(value, p.default):
            continue
        args.append(f"{p.name}={text}")
    return f"{refs.ref(cls, need)}({', '.join(args)})"


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


# --- the writer ---------------------------------------------------------------

class _Writer:
    def __init__(self, gm: fx.GraphModule, source: Optional[Dict[str, Any]]):
        self.gm = gm
        self.source = _check_source(source)
        self.refs = _Refs(self.source["path"] if self.source and self.source["kind"] == "file" else None)
        self.ns: Dict[str, Any] = {"torch": torch}
        self._source_model: Optional[nn.Module] = None
        self.uses_source_model = False
        self.body: List[str] = []       # statements in __init__, after super().__init__()
        self.extra_state: Dict[str, torch.Tensor] = {}  # tensors not in gm.state_dict()
        self.refs.module_paths = {id(m): name for name, m in gm.named_modules() if name}
        self.ns["self"] = gm  # what `self.get_submodule(path)` arguments see while checking

    # module tree -----------------------------------------------------------
    def build(self) -> None:
        self._children("", self.gm)
        self._direct_tensors("", self.gm)
        self._get_attr_constants()
        self._ties_and_frozen()

    def _children(self, prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if child._forward_hooks or child._forward_pre_hooks or child._backward_hooks:
                raise BadInput(f"cannot export submodule '{path}' ({type(child).__name__}): it has hooks, "
                               "which module.py cannot carry")
            if type(child) in _CONTAINERS:
                self.body.append(f"_attach(self, {path!r}, {_CONTAINERS[type(child)]})")
                self._children(path, child)
                self._direct_tensors(path, child)
            else:
                self.body.append(f"_attach(self, {path!r}, {self._constructor(path, child)})")
                self._carry_non_persistent(path, child)

    def _carry_non_persistent(self, path: str, m: nn.Module) -> None:
        """A rebuilt module's non-persistent buffers (PSGD's EMA range) hold
        state its constructor cannot give back: module.py makes them
        persistent and the weights file carries their values."""
        for prefix, sub in m.named_modules():
            for name in sorted(sub._non_persistent_buffers_set):
                b = sub._buffers.get(name)
                if b is None:
                    continue
                full = _join(_join(path, prefix) if prefix else path, name)
                self.body.append(f"_persist(self, {full!r})")
                self.extra_state[full] = b.detach()

    def _direct_tensors(self, path: str, m: nn.Module) -> None:
        for name, p in m._parameters.items():
            if p is None:
                continue
            self.body.append(f"_parameter(self, {_join(path, name)!r}, {literal(tuple(p.shape))}, {p.dtype})")
        for name, b in m._buffers.items():
            if b is None:
                continue
            self.body.append(f"_buffer(self, {_join(path, name)!r}, {literal(tuple(b.shape))}, {b.dtype})")
            if name in m._non_persistent_buffers_set:  # made persistent so the weights carry it
                self.extra_state[_join(path, name)] = b.detach()

    def _get_attr_constants(self) -> None:
        """get_attr targets that are plain tensor attributes (not parameters or
        buffers) become buffers, so the weights file carries them."""
        seen: Set[str] = set()
        for node in self.gm.graph.nodes:
            if node.op != "get_attr" or node.target in seen:
                continue
            seen.add(node.target)
            owner_path, _, field = str(node.target).rpartition(".")
            owner = self.gm.get_submodule(owner_path)
            if field in owner._parameters or field in owner._buffers or field in owner._modules:
                continue
            value = getattr(owner, field)
            if isinstance(value, torch.Tensor):
                self.body.append(f"_buffer(self, {node.target!r}, {literal(tuple(value.shape))}, {value.dtype})")
                self.extra_state[str(node.target)] = value.detach()
            else:
                try:
                    self.body.append(f"_set(self, {node.target!r}, {literal(value)})")
                except _NoExpr:
                    raise BadInput(f"cannot export attribute '{node.target}': a {type(value).__name__} "
                                   "is neither a tensor nor a plain value") from None

    def _ties_and_frozen(self) -> None:
        first: Dict[int, str] = {}
        for name, p in self.gm.named_parameters(remove_duplicate=False):
            if id(p) in first:  # tied weights must stay one Parameter to train alike
                self.body.append(f"_tie(self, {name!r}, {first[id(p)]!r})")
            else:
                first[id(p)] = name
                if not p.requires_grad:
                    self.body.append(f"self.get_parameter({name!r}).requires_grad_(False)")

    # constructors ------------------------------------------------------------
    def _constructor(self, path: str, m: nn.Module) -> str:
        reasons = []
        candidates: List[Tuple[str, Callable]] = []
        if callable(getattr(m, "fxc_constructor", None)):
            candidates.append(("fxc_constructor()", _from_fxc_constructor))
        candidates.append(("constructor arguments from attributes", _from_attributes))
        for what, make in candidates:
            need: Dict[str, None] = {}
            try:
                expr = make(m, self.refs, need)
                expr = self._verified(m, expr, need, attributes=make is not _from_fxc_constructor)
            except _NoExpr as e:
                reasons.append(f"{what}: {e}")
                continue
            self.refs.commit(need)
            return expr
        expr, why = self._from_source(path, m)
        if expr:
            return expr
        reasons.append(why)
        raise BadInput(f"cannot export submodule '{path}' ({type(m).__module__}.{type(m).__qualname__}): "
                       + "; ".join(reasons)
                       + ". Give a model source (a model file or torchvision:NAME), or define "
                       "fxc_constructor() -> (callable, args, kwargs) on the class")

    def _verified(self, m: nn.Module, expr: str, need, attributes: bool = True) -> str:
        # On the meta device a candidate costs no weight init (buffer values
        # are not compared: the weights file carries them all).
        built = self._eval(expr, need, meta=True)
        why = _mismatch(m, built, attributes)
        dtype = _common_float_dtype(m)
        if why and dtype is not None and _common_float_dtype(built) not in (None, dtype):
            expr = f"{expr}.to({dtype})"
            built = built.to(dtype)
            why = _mismatch(m, built, attributes)
        if why:
            raise _NoExpr(f"{expr} does not match ({why})")
        return expr

    def _eval(self, expr: str, need, meta: bool = False) -> Any:
        ns = dict(self.ns)
        for line in need:
            if line == "#source":
                ns["_source"] = sys.modules[self._source_module_name()]
            else:
                exec(line, ns)
        if meta:
            try:
                with torch.device("meta"):
                    return eval(expr, ns)
            except Exception:
                pass  # some constructors compute on their tensors; build for real
        try:
            return eval(expr, ns)
        except Exception as e:
            raise _NoExpr(f"{expr} raised {type(e).__name__}: {e}") from None

    def _source_module_name(self) -> str:
        # The same file may be loaded under several names (imported by a test
        # and loaded by fxcompress.loading); the model's classes come from
        # the module the loader recorded, so prefer that one.
        recorded = (self.source or {}).get("module")
        if recorded in sys.modules and _file_of(recorded) == self.refs.source_file:
            return recorded
        for name, mod in list(sys.modules.items()):
            if _file_of(name) == self.refs.source_file:
                return name
        raise _NoExpr("the model file is not loaded")

    def _inferred_source(self) -> Optional[Dict[str, Any]]:
        """With no source given: the model's own class, when it is defined at
        module level in a file and builds without arguments (the user's
        source then carries what no constructor can rebuild)."""
        mod, qualname = self.gm.meta.get("fxc_model_class", (None, None))
        path = _file_of(mod) if mod else None
        if not path or not qualname or "." in qualname or not path.endswith(".py"):
            return None
        try:
            cls = getattr(sys.modules[mod], qualname)
            cls()
        except Exception:
            return None
        return {"kind": "file", "path": path, "model_fn": qualname, "module": mod}

    def _from_source(self, path: str, m: nn.Module) -> Tuple[Optional[str], str]:
        if self.source is None:
            inferred = self._inferred_source()
            if inferred is None:
                return None, "no model source to rebuild it from (the model's class needs constructor arguments)"
            self.source = inferred
            self.refs.source_file = inferred["path"]
        try:
            model = self._built_source()
        except Exception as e:
            return None, f"building the source model failed: {type(e).__name__}: {e}"
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            return None, f"the source model has no submodule '{path}'"
        why = _mismatch(m, sub)
        if why:
            return None, f"the source model's '{path}' does not match ({why})"
        self.uses_source_model = True
        return f"src.get_submodule({path!r})", ""

    def _built_source(self) -> nn.Module:
        if self._source_model is None:
            self._source_model = _build_source(self.source)
        return self._source_model

    # rendering -----------------------------------------------------------------
    def render(self) -> str:
        pc = self.gm.graph.python_code(root_module="self")
        global_lines = _global_lines(pc.globals, pc.src, self.refs)
        init = ["super().__init__()"]
        if self.uses_source_model:
            init.append("src = _build_source()  # submodules whose constructor could not be inferred")
        init += self.body
        prologue, forward = _split_forward(pc.src)
        from_file = self.needs_source_file
        parts = [_HEADER.format(source=json.dumps(self.source))]
        parts += ["import importlib.util", "import os", "import sys"] if from_file else ["import os"]
        parts += ["", "import torch"]
        parts += sorted(line for line in self.refs.imports if line != "import torch")
        parts += ["", "_HERE = os.path.dirname(os.path.abspath(__file__))", ""]
        if from_file:
            parts += ["", _SOURCE_FILE_LOADER, ""]
        if self.uses_source_model:
            parts += ["", self._source_builder(), ""]
        if global_lines:
            parts += global_lines + [""]
        if prologue:
            parts += prologue + [""]
        parts += ["", _HELPERS, "", "", f"class {CLASS_NAME}(torch.nn.Module):", "    def __init__(self):"]
        parts += ["        " + line for line in init]
        parts += ["", forward.rstrip(), "", "", _LOAD.lstrip("\n")]
        return "\n".join(parts) + "\n"

    @property
    def needs_source_file(self) -> bool:
        return self.refs.uses_source or (self.uses_source_model and self.source["kind"] == "file")

    def _source_builder(self) -> str:
        if self.source["kind"] == "torchvision":
            kwargs = literal(dict(self.source.get("kwargs") or {}))
            return ("def _build_source():\n    import torchvision.models\n\n"
                    f"    return torchvision.models.get_model({self.source['name']!r}, weights=None, **{kwargs})")
        return f"def _build_source():\n    return _source.{self.source['model_fn']}()"

    def state(self) -> Dict[str, torch.Tensor]:
        state = dict(self.gm.state_dict())
        state.update(self.extra_state)
        return {k: v.detach().cpu() for k, v in state.items()}


def _split_forward(src: str) -> Tuple[List[str], str]:
    """fx's source is module-level statements (torch.fx.wrap calls, which
    must run at module level) followed by `def forward`; the def goes into
    the class, indented."""
    lines = src.strip("\n").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def forward"))
    prologue = [line for line in lines[:start] if line.strip()]
    body = "\n".join(("    " + line) if line.strip() else "" for line in lines[start:])
    return prologue, body


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_HEADER = '''"""A model rewritten by fxcompress; generated by fxcompress.export, do not edit.

Source: {source}
Use: `load()` builds CompressedModule and loads weights.pt beside this file.
"""'''

_SOURCE_FILE_LOADER = '''def _load_source_file():
    # The model file the rewritten model came from, copied beside this one.
    name = __name__ + "_source"
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, "source_model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_source = _load_source_file()'''

_HELPERS = '''def _owner(root, path):
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def _attach(root, path, module):
    owner, name = _owner(root, path)
    owner.add_module(name, module)


def _parameter(root, path, shape, dtype):
    owner, name = _owner(root, path)
    owner.register_parameter(name, torch.nn.Parameter(torch.empty(shape, dtype=dtype)))


def _buffer(root, path, shape, dtype):
    owner, name = _owner(root, path)
    owner.register_buffer(name, torch.empty(shape, dtype=dtype))


def _set(root, path, value):
    owner, name = _owner(root, path)
    setattr(owner, name, value)


def _persist(root, path):
    owner, name = _owner(root, path)
    owner._non_persistent_buffers_set.discard(name)


def _tie(root, path, to):
    owner, name = _owner(root, path)
    setattr(owner, name, root.get_parameter(to))'''

_LOAD = '''
def load(directory=None, map_location="cpu", weights="weights.pt"):
    """Build CompressedModule and load its weights (strict) from `directory`
    (default: this file's folder); `weights` may name weights.safetensors."""
    directory = directory or _HERE
    path = os.path.join(directory, weights)
    model = CompressedModule()
    if path.endswith(".safetensors"):
        state = _load_safetensors(path)
    else:
        state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def _load_safetensors(path):
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("fxc_aliases", "{}"))
    for name, same_as in aliases.items():  # shared tensors are stored once
        state[name] = state[same_as]
    return state'''


# --- sources ------------------------------------------------------------------

def _check_source(source: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if source is None:
        return None
    if not isinstance(source, dict) or source.get("kind") not in ("torchvision", "file"):
        raise BadInput("export source must be {'kind': 'torchvision', 'name': ...} or "
                       f"{{'kind': 'file', 'path': ..., 'model_fn': ...}}, got {source!r}")
    need = ("name",) if source["kind"] == "torchvision" else ("path", "model_fn")
    missing = [k for k in need if not source.get(k)]
    if missing:
        raise BadInput(f"export source {source!r} lacks {', '.join(missing)}")
    if source["kind"] == "file":
        if not os.path.isfile(source["path"]):
            raise BadInput(f"export source file not found: {source['path']}")
        source = dict(source, path=os.path.abspath(source["path"]))
    return source


def _build_source(source: Dict[str, Any]) -> nn.Module:
    if source["kind"] == "torchvision":
        return tvm.get_model(source["name"], weights=None, **(source.get("kwargs") or {}))
    # Build from the module the original model's classes came from (when it
    # is loaded): a second import would make classes that compare unequal.
    for name in list(sys.modules):
        if _file_of(name) == source["path"]:
            return getattr(sys.modules[name], source["model_fn"])()
    return load_model(source["path"], source["model_fn"]).model


# --- weights ------------------------------------------------------------------

def _save_safetensors(state: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory: store each storage
    # once and record the other names as aliases of it.
    def storage(t):
        return t.untyped_storage().data_ptr()

    users: Dict[int, int] = {}
    for t in state.values():
        users[storage(t)] = users.get(storage(t), 0) + 1
    kept: Dict[Tuple, str] = {}
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    for name, t in state.items():
        key = (storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        # other views of one storage (slices of a fused weight) must not share
        out[name] = t.contiguous().clone() if users[storage(t)] > 1 or not t.is_contiguous() else t
    save_file(out, str(path), metadata={"format": "pt", "fxc_aliases": json.dumps(aliases)})


def _self_check(directory: Path) -> None:
    """Import the written module.py and load its weights once, strictly."""
    name = f"fxc_export_check_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, directory / "module.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        module.load(str(directory))
    except Exception as e:
        raise RunFailure(f"the exported {directory / 'module.py'} does not load: {type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(name + "_source", None)


# --- entry point ----------------------------------------------------------------

def export(cm, directory, source: Optional[Dict[str, Any]] = None, check: bool = True,
           notes: Optional[List[str]] = None) -> List[Path]:
    """Write `cm` to `directory` (created if needed); return the written paths.

    `source` says where the model came from (what fxcompress.loading records
    as `LoadedModel.source`); it is needed only for submodules whose
    constructor cannot be inferred. `check=False` skips loading the result
    back, which costs one more build of the model. `notes` (a list) gets
    what was not written and why (no Graphviz: no graph.svg).
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise BadInput(f"export directory {out} exists and is not a folder")
    gm = cm.graph_module
    writer = _Writer(gm, source)
    writer.build()
    text = writer.render()
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if writer.needs_source_file:
        shutil.copyfile(writer.source["path"], out / SOURCE_COPY)
        written.append(out / SOURCE_COPY)
    (out / "module.py").write_text(text)
    written.append(out / "module.py")
    state = writer.state()
    torch.save(state, out / "weights.pt")
    written.append(out / "weights.pt")
    if importlib.util.find_spec("safetensors") is not None:
        _save_safetensors(state, out / "weights.safetensors")
        written.append(out / "weights.safetensors")
    report = {"source": writer.source, "class": CLASS_NAME, **cm.report().to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    written.append(out / "report.json")
    graph = write_graph(cm, out / "graph")
    written += graph.paths
    if graph.note and notes is not None:
        notes.append(graph.note)
    if check:
        _self_check(out)
    return written


__all__ = ["export", "literal", "CLASS_NAME"]
