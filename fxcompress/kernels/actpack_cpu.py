"""The activation packers' C loops (actpack_cpu.c): their ctypes signatures
and the loaded library. One loop per pack/unpack, compiled once with the
system compiler (kernels/cbuild.py); FXC_CPU_FAST=0 turns it off.
torch.compile of the reference was measured as the CPU option and rejected:
with dynamic shapes it generated slow code (0.3-0.5 GB/s), with static ones
every activation shape paid its own 10-60 s compile (see lib).
"""
from __future__ import annotations

import ctypes
import os

from .cbuild import load_library, on_torch_threads

_SRC = os.path.join(os.path.dirname(__file__), "actpack_cpu.c")


def _declare(lib) -> None:
    P, I64, I, U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    lib.fxc_quant_pack.argtypes = [P, P, I64, I64, I64, I, I, I, I, I, U32, P]
    lib.fxc_pack_codes.argtypes = [P, I64, I, I, P]
    lib.fxc_unpack_codes.argtypes = [P, I64, I, I, I, P]
    lib.fxc_unpack_dequant.argtypes = [P, P, I64, I64, I64, I, I, P]
    lib.fxc_dequant_codes.argtypes = [P, P, I64, I64, I64, I, I, P]
    lib.fxc_pack_mask.argtypes = [P, I64, P]
    lib.fxc_unpack_mask.argtypes = [P, I64, P]
    lib.fxc_stats.argtypes = [P, I64, I64, I64, P, P]
    lib.fxc_unpack_mask_values.argtypes = [P, I64, ctypes.c_float, ctypes.c_float, P]
    lib.fxc_pack_gt.argtypes = [P, I64, ctypes.c_float, P]
    lib.fxc_stats_nnz.argtypes = [P, I64, I64, I64, P, P, P]
    lib.fxc_pack_gt_stats.argtypes = [P, I64, I64, I64, P, P, P, P]
    lib.fxc_pack_gt_stats.restype = I
    lib.fxc_group_widths.argtypes = [I64, P, P, I, ctypes.c_float, P, P, P, P, P, P, P]
    lib.fxc_group_widths.restype = I
    lib.fxc_window_local.argtypes = [P, I64, I64, I64, I64, I, I, I, I, I, I, I, P]
    lib.fxc_window_global.argtypes = [P, I64, I64, I64, I64, I, I, I, I, I, I, I, P]
    lib.fxc_window_local.restype = lib.fxc_window_global.restype = None
    for f, extra in (("fxc_mixed_pack", [P, P, I64, I64, I64, P, I, P, P, P, P, P, I, I, P, P]),
                     ("fxc_mixed_unpack", [P, P, P, P, P, I64, I64, I64, P, I, P, P, I, P]),
                     ("fxc_mixed_zvc_pack", [P, P, I64, I64, I64, P, I, P, P, P, P, P, P, I, P, P, P]),
                     ("fxc_mixed_zvc_unpack", [P, P, P, P, P, I64, I64, I64, P, I, P, P, P, P])):
        getattr(lib, f).argtypes = extra
        getattr(lib, f).restype = I
    # AutoQuant in two calls per tensor (kernels/auto_pack.py)
    D = ctypes.c_double
    lib.fxc_auto_plan.argtypes = [I64, I64, I64, P, D, P, D, D, D, P, I, I, I, I, I, P]
    lib.fxc_auto_plan.restype = I64
    lib.fxc_auto_pack.argtypes = [P, I64, I64, I64, P, I, I, I, I64, P, P]
    lib.fxc_auto_pack.restype = I64
    lib.fxc_auto_unpack.argtypes = [P, P, I64, I64, I64, I, I, P, P]
    lib.fxc_auto_unpack.restype = I
    lib.fxc_set_threads.argtypes = [I]
    lib.fxc_stats.restype = lib.fxc_stats_nnz.restype = I
    for f in ("fxc_quant_pack", "fxc_pack_codes", "fxc_unpack_codes", "fxc_unpack_dequant",
              "fxc_dequant_codes", "fxc_pack_mask", "fxc_unpack_mask", "fxc_unpack_mask_values",
              "fxc_pack_gt", "fxc_set_threads"):
        getattr(lib, f).restype = None


def lib():
    """The compiled C loops, or None (no compiler: the torch reference runs),
    set to run on torch.get_num_threads() threads (read on every call: a
    torch.set_num_threads between calls takes effect at the next one).

    Built and loaded by kernels/cbuild.py. Measured alternatives
    (ARCHITECTURE.md recipe, 8 MB tensor, 1 thread): eager torch
    0.06-0.7 GB/s; torch.compile with dynamic shapes 0.3-0.5 GB/s; static
    shapes 1.8 GB/s but one 10-60 s compile per tensor shape."""
    return on_torch_threads(load_library(_SRC, "actpack", _declare), "fxc_set_threads")
