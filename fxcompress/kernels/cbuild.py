"""Compile a C source of this package once and load it with ctypes.

The CPU fast paths (actpack_cpu.c, scaled_grad_cpu.c) are plain C loops: no
build system, no torch headers, about a second to compile with the system
compiler. The shared object is cached per user under a name keyed by the
source text and this CPU's flags (-march=native code is only valid on the
CPU it was built for). No compiler, or a failed build, gives None and the
callers take their torch reference path. FXC_CPU_FAST=0 turns every C path
off (the tests use it to run the reference).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import subprocess
import tempfile
import threading
from typing import Callable, Dict, Optional

import torch

_lock = threading.Lock()
_loaded: Dict[str, Optional[ctypes.CDLL]] = {}


def cpu_fast_enabled() -> bool:
    return os.environ.get("FXC_CPU_FAST", "1") != "0"


def _build(src_path: str, stem: str) -> ctypes.CDLL:
    src = open(src_path, "rb").read()
    # the local headers a source includes are part of what gets compiled,
    # so part of the cache key too
    here = os.path.dirname(src_path)
    for name in re.findall(rb'^#include "([^"]+)"', src, re.M):
        with open(os.path.join(here, name.decode()), "rb") as f:
            src += f.read()
    cpu = platform.machine()
    try:
        cpu += next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        pass
    tag = hashlib.sha1(src + cpu.encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fxcompress")
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"{stem}_{tag}.so")
    if not os.path.exists(so):
        cc = os.environ.get("CC", "cc")
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        # -ffp-contract=off: a*b + c rounds twice, as torch's separate ops do,
        # which is what keeps the C paths bitwise equal to the references
        base = [cc, "-O3", "-ffp-contract=off", "-fPIC", "-shared", src_path, "-o", tmp, "-lm"]
        # -fopenmp: links libgomp by its soname, which is the one torch has
        # already loaded, so the C loops share torch's OpenMP runtime and pool
        # (kernels/actpack_cpu.c); without it the pragmas are ignored and
        # the loops run on one thread, with the same results
        for flags in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
            try:
                subprocess.run(base + flags, check=True, capture_output=True, timeout=120)
                break
            except Exception:  # noqa: BLE001 - a compiler without these flags
                if not flags:
                    raise
        os.replace(tmp, so)  # atomic: concurrent processes never load half a file
    return ctypes.CDLL(so)


def load_library(src_path: str, stem: str, declare: Callable[[ctypes.CDLL], None]) -> Optional[ctypes.CDLL]:
    """The compiled library for `src_path` with its signatures set by
    `declare`, built on first use; None when it cannot be built (cached, so
    a missing compiler costs one try per process)."""
    if src_path in _loaded:
        return _loaded[src_path]
    with _lock:
        if src_path not in _loaded:
            try:
                lib = _build(src_path, stem)
                declare(lib)
            except Exception:  # noqa: BLE001 - the reference path is always there
                lib = None
            _loaded[src_path] = lib
    return _loaded[src_path]


_threads: Dict[tuple, int] = {}


def on_torch_threads(lib: Optional[ctypes.CDLL], setter: str) -> Optional[ctypes.CDLL]:
    """lib, with its thread count (the C function `setter`, taking an int)
    set to torch.get_num_threads(): read on every call, so a
    torch.set_num_threads between calls takes effect at the next one; the
    C call is made only when the count changed."""
    if lib is not None:
        n = torch.get_num_threads()
        if _threads.get((id(lib), setter)) != n:
            getattr(lib, setter)(n)
            _threads[(id(lib), setter)] = n
    return lib
