"""The plan: one resolved treatment set per node, before anything is rewritten.

Rules are applied in order. For each node, every rule whose `match` holds
contributes its treatments: fields merge into what earlier rules set, and
`null` removes the treatment. A treatment that the pass says does not apply
to the node (a weight treatment on a ReLU, say) is listed as skipped with
the reason. A rule that ends up matching nothing is an error unless it is
`optional: true`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .config import to_dict
from .errors import closest
from .policy import Policy, Rule, build_config


@dataclass
class PlanEntry:
    name: str            # fx node name
    qualname: str        # what `match.name` is matched against
    kind: str            # fx op: call_module, call_function, ...
    target: str          # module type or function/method name
    shape: Optional[Tuple[int, ...]] = None
    dtype: Optional[str] = None
    rules: List[int] = field(default_factory=list)
    treatments: Dict[str, Any] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    # per treatment, the fields a pass will really use where they differ from
    # the config (PSGD's first/last rule: bits=8 where the rule says 2)
    effective: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "node": self.name, "qualname": self.qualname, "kind": self.kind, "target": self.target,
            "shape": list(self.shape) if self.shape is not None else None, "dtype": self.dtype,
            "rules": self.rules,
            "treatments": {k: to_dict(v) for k, v in self.treatments.items()},
            "skipped": dict(self.skipped),
            "effective": {k: dict(v) for k, v in self.effective.items()},
        }


@dataclass
class Plan:
    entries: Dict[str, PlanEntry] = field(default_factory=dict)
    policy: Optional[Policy] = None
    gm: Optional[fx.GraphModule] = field(default=None, repr=False)

    def selected(self, key: str) -> List[Tuple[fx.Node, Any]]:
        """(node, config) for every node with treatment `key`, in graph order."""
        out = []
        if self.gm is None:
            return out
        for node in self.gm.graph.nodes:
            e = self.entries.get(node.name)
            if e is not None and key in e.treatments:
                out.append((node, e.treatments[key]))
        return out

    def replace_node(self, old_name: str, new_node: fx.Node) -> None:
        """A pass that replaces a node keeps its plan entry under the new name,
        so later passes still find the node's treatments."""
        e = self.entries.pop(old_name, None)
        if e is not None:
            e.name = new_node.name
            self.entries[new_node.name] = e

    @property
    def selected_entries(self) -> List[PlanEntry]:
        """Entries with a matching rule, in the graph's order (a pass that
        replaces a node re-files its entry, so dict order is not enough)."""
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)} if self.gm is not None else {}
        entries = [e for e in self.entries.values() if e.rules]
        return sorted(entries, key=lambda e: order.get(e.name, len(order)))

    def to_json(self) -> Dict[str, Any]:
        return {"nodes": [e.as_dict() for e in self.selected_entries]}


def node_target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def node_qualname(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = ""
    if stack:
        scope = list(stack.values())[-1][0]
    return f"{scope}.{node.name}" if scope else node.name


def _type_names(node: fx.Node, gm: fx.GraphModule) -> List[str]:
    if node.op != "call_module":
        return []
    cls = type(gm.get_submodule(node.target))
    names = []
    for c in cls.__mro__:
        names += [c.__name__, f"{c.__module__}.{c.__qualname__}"]
    return names


def _name_matches(pattern: str, qualname: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], qualname) is not None
    return fnmatch.fnmatchcase(qualname, pattern)


def rule_matches(rule: Rule, node: fx.Node, gm: fx.GraphModule) -> bool:
    m = rule.match
    if m.name and not any(_name_matches(p, node_qualname(node)) for p in m.name):
        return False
    if m.type:
        types = _type_names(node, gm)
        if not any(t in types for t in m.type):
            return False
    if m.op:
        if node.op not in ("call_function", "call_method"):
            return False
        if node_target_name(node, gm) not in m.op:
            return False
    return True


def _shape_dtype(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape), str(meta.dtype).replace("torch.", "")
    return None, None


CANDIDATE_OPS = ("call_module", "call_function", "call_method", "get_attr")


def make_plan(gm: fx.GraphModule, policy: Policy, passes: Sequence[type]) -> Plan:
    """The plan of `policy` on `gm` for the given pass list (the one the
    policy was loaded with: each treatment's pass decides where it applies)."""
    passes = {p.key: p() for p in passes if p.key}
    for r in policy.rules:
        for key in r.treatments:
            if key not in passes:
                raise policy.error(f"treatment '{key}' has no pass in this compile's pass list "
                                   f"({', '.join(passes) or 'empty'}); load the policy with the same passes",
                                   ("rules", r.index, key))
    plan = Plan(policy=policy, gm=gm)
    matched = {r.index: 0 for r in policy.rules}
    applied = {r.index: 0 for r in policy.rules}
    configs: Dict[tuple, Any] = {}
    for node in gm.graph.nodes:
        if node.op not in CANDIDATE_OPS:
            continue
        rules = [r for r in policy.rules if rule_matches(r, node, gm)]
        if not rules:
            continue
        shape, dtype = _shape_dtype(node)
        entry = PlanEntry(node.name, node_qualname(node), node.op, node_target_name(node, gm), shape, dtype,
                          rules=[r.index for r in rules])
        merged: Dict[str, Dict[str, Any]] = {}
        last_rule: Dict[str, Rule] = {}
        for r in rules:
            matched[r.index] += 1
            for key, fields in r.treatments.items():
                if fields is None:
                    merged.pop(key, None)
                    applied[r.index] += 1  # an opt-out did its job
                    continue
                merged.setdefault(key, {}).update(fields)
                last_rule[key] = r
        for key, fields in merged.items():
            reason = passes[key].applies_to(node, gm)
            if reason:
                entry.skipped[key] = reason
                continue
            # Many nodes share the same merged settings: build each distinct
            # config once (configs are read-only to the passes).
            ck = (key, last_rule[key].index, repr(sorted(fields.items())))
            if ck not in configs:
                configs[ck] = build_config(policy, key, type(passes[key]).config, fields, last_rule[key])
            entry.treatments[key] = configs[ck]
            for r in rules:
                if key in r.treatments and r.treatments[key] is not None:
                    applied[r.index] += 1
        plan.entries[node.name] = entry
    _check_rules_matched(gm, policy, matched, applied)
    for p in passes.values():  # a pass may say what it will really apply (see PlanEntry.effective)
        for name, fields in (p.effective(gm, plan) if hasattr(p, "effective") else {}).items():
            plan.entries[name].effective[p.key] = fields
    return plan


def _check_rules_matched(gm, policy: Policy, matched, applied) -> None:
    for r in policy.rules:
        if r.optional:
            continue
        if matched[r.index] == 0:
            names = [node_qualname(n) for n in gm.graph.nodes if n.op in CANDIDATE_OPS]
            hint = None
            for pat in r.match.name:
                hint = closest(re.sub(r"[*?\[\]]|^re:", "", pat), names) or hint
            if not hint and r.match.type:
                types = sorted({type(m).__name__ for m in gm.modules()})
                hint = closest(r.match.type[0], types)
            raise policy.error(f"rule matches no node ({r.match.describe()}); "
                               "add 'optional: true' if that is intended", ("rules", r.index, "match"), hint)
        wants = [k for k, v in r.treatments.items() if v is not None]
        if wants and applied[r.index] == 0:
            raise policy.error(f"rule matches {matched[r.index]} node(s) but its treatment "
                               f"({', '.join(wants)}) applies to none of them; "
                               "add 'optional: true' if that is intended", ("rules", r.index))
