"""AutoQuant's per-channel widths in one C call (autobits_cpu.c).

`auto_bits` returns what runtime/widths.py's numpy reference
(`auto_bits` with `spend_slack` and `_bn_dx2_np`) returns, bit for
bit (the C code keeps numpy's operation order, its pairwise sums and a
stable sort; tests/test_autoquant.py holds the two against each other), or
None when the C path does not apply and the caller runs the reference.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any, Dict, Optional

import numpy as np
import torch

from .cbuild import cpu_fast_enabled, load_library

_SRC = os.path.join(os.path.dirname(__file__), "autobits_cpu.c")
_BN_KEYS = ("inv_std2", "nnz2", "gz2_max", "ggamma2", "gamma2")


def _declare(lib) -> None:
    P, I64, D, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.fxc_auto_bits.argtypes = [I64, P, D, P, D, D, D, P, I, I, I, P, P, P]
    lib.fxc_auto_bits.restype = None


def _lib():
    if not cpu_fast_enabled():
        return None
    return load_library(_SRC, "autobits", _declare)


def _bn_arrays(terms: Dict[str, Any], C: int):
    """The BatchNorm terms as C float64 arrays of C channels (scalars
    broadcast), cached in the terms dict like the reference's numpy copy."""
    cached = terms.get("_c")
    if cached is None or cached[0] != C:
        arrs = []
        for k in _BN_KEYS:
            v = terms[k]
            v = v.detach().double().cpu().numpy() if torch.is_tensor(v) else np.asarray(v, dtype=np.float64)
            arrs.append(np.ascontiguousarray(np.broadcast_to(v, (C,)), dtype=np.float64))
        cached = terms["_c"] = (C, arrs, float(terms["K"]), float(terms["numer"]))
    # the pointer array is made per call, not cached: the terms dict lives on
    # a SaveSpec, and a ctypes pointer array there makes the model impossible
    # to deepcopy or pickle (EMA copies, torch.save(cm))
    C, arrs, K, numer = cached
    return C, arrs, (ctypes.c_void_p * len(arrs))(*[a.ctypes.data for a in arrs]), K, numer


def auto_bits(amax: torch.Tensor, eps: float, bn_terms: Optional[Dict[str, Any]], dx2: float,
              counts: Optional[torch.Tensor], signed: bool, max_bits: int, rounds: int = 4) -> Optional[np.ndarray]:
    """Widths (int64, one per channel) for per-channel max|x| `amax`: the SPEC
    rule on budget `dx2` (or BatchNorm's per-channel budget from `bn_terms`),
    then, with `counts`, spend_slack's `rounds`. None: take the reference."""
    lib = _lib()
    if lib is None or amax.dtype != torch.float32 or amax.device.type != "cpu" or amax.dim() != 1:
        return None
    C = amax.numel()
    if C == 0 or (counts is not None and counts.numel() != C):
        return None
    a = amax.contiguous()
    if bn_terms is not None:
        try:
            _, _, bn_ptrs, K, numer = _bn_arrays(bn_terms, C)
        except ValueError:  # a term of another length: the reference decides
            return None
    else:
        bn_ptrs, K, numer = None, 0.0, 0.0
    cnt = None
    if counts is not None:
        cnt = np.ascontiguousarray(counts.detach().cpu().numpy(), dtype=np.float64)
    bits = np.empty(C, dtype=np.int64)
    work = np.empty(6 * C, dtype=np.float64)
    iwork = np.empty(2 * C, dtype=np.int64)
    lib.fxc_auto_bits(C, a.data_ptr(), float(eps), bn_ptrs, K, numer, float(dx2),
                      None if cnt is None else cnt.ctypes.data, int(bool(signed)), int(max_bits), int(rounds),
                      work.ctypes.data, iwork.ctypes.data, bits.ctypes.data)
    return bits
