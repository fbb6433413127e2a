"""The ledger of one compiled graph's compressed saves.

Every SaveSpec of a graph shares one Ledger: the registry through which a
storage saved by several ops is packed once (keyed by storage, view geometry
and version), and the measured byte counts of the current forward, per node.
"""
from __future__ import annotations

import uuid
import weakref
from typing import Any, Dict, Optional

import torch


class Ledger:
    """Per compiled graph: the shared-storage registry and the byte counts of
    the current forward (reset by the first save node of each forward).

    A pack belongs to one forward: the registry is emptied with the counts,
    so a tensor object fed again (a fixed batch) is packed again, with new
    stochastic draws and the widths of now, not found from an earlier
    forward. (The finalizers of earlier entries pop from the dict they were
    registered with, never from this forward's.)"""

    def __init__(self):
        self.registry: Dict[tuple, Any] = {}
        self.seen: set = set()  # storages already counted in this forward
        self.counted: set = set()  # ids of packed objects already counted in this forward
        self.nodes: Dict[str, Dict[str, float]] = {}
        self.forwards = 0
        self.fxc_key: Optional[str] = None  # set once the graph is exported (export_key)

    def reset(self) -> None:
        self.registry = {}
        self.seen = set()
        self.counted = set()
        self.nodes = {}
        self.forwards += 1

    def __getstate__(self):
        # a copy (deepcopy, pickle) keeps the last forward's figures; the
        # registry and the counted sets are keyed by the addresses of this
        # process's live tensors, so they start empty (the next forward
        # fills them)
        state = dict(self.__dict__)
        state.update(registry={}, seen=set(), counted=set())
        return state

    def export_key(self) -> str:
        """The key every exported spec of this graph names its ledger by
        (rebuild_save_spec joins the specs of one instance on it)."""
        if self.fxc_key is None:
            self.fxc_key = uuid.uuid4().hex[:16]
        return self.fxc_key

    def totals(self) -> Dict[str, float]:
        fp = sum(v["fp32_bytes"] for v in self.nodes.values())
        st = sum(v["stored_bytes"] for v in self.nodes.values())
        el = sum(v["quant_elements"] for v in self.nodes.values())
        bits = sum(v["quant_bits"] for v in self.nodes.values())
        return {"fp32_bytes": fp, "stored_bytes": st, "ratio": fp / st if st else float("inf") if fp else 1.0,
                "avg_bits": bits / el if el else 0.0}


def _node_stats(ledger: Ledger, name: str) -> Dict[str, float]:
    d = ledger.nodes.get(name)
    if d is None:
        d = ledger.nodes[name] = {"fp32_bytes": 0.0, "stored_bytes": 0.0, "quant_elements": 0.0,
                                  "quant_bits": 0.0, "kept": 0.0}
    return d


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensors without storage (sparse, meta)
        ptr = id(t)
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version, t.device)



# Ledgers of rebuilt specs by key: weak, so a Ledger lives as long as specs use it.
_SHARED_LEDGERS: "weakref.WeakValueDictionary[str, Ledger]" = weakref.WeakValueDictionary()


def shared_ledger(key: str, first: bool) -> Ledger:
    """The Ledger rebuilt specs of one exported graph share: the `first` spec
    of a graph starts a new one, the specs built after it join it."""
    ledger = None if first else _SHARED_LEDGERS.get(key)
    if ledger is None:
        ledger = Ledger()
        ledger.fxc_key = key
        _SHARED_LEDGERS[key] = ledger
    return ledger
