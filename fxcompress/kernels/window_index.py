"""Max-pool indices as window slots: a max-pool's saved int64 indices (flat
input positions) stored as the position inside each output's window
(0..kh*kw-1, a few bits), and back. The torch code here is the reference;
fxc_window_local / fxc_window_global are its C loops.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import bufpool
from .actpack_cpu import lib as _lib
from .dispatch import backend_for

def _window_geom(geom: dict) -> Tuple[int, int, int, int, int, int, int]:
    """(kw, sh, sw, ph, pw, dh, dw) of a max-pool geometry dict."""
    _, kw = geom["kernel"]
    sh, sw = geom["stride"]
    ph, pw = geom["padding"]
    dh, dw = geom["dilation"]
    return kw, sh, sw, ph, pw, dh, dw


def window_local(idx: torch.Tensor, geom: dict) -> torch.Tensor:
    """Max-pool indices (flat input positions, int64, (..., OH, OW)) as the
    position inside each output's window (int32, 0..kh*kw-1)."""
    kw, sh, sw, ph, pw, dh, dw = _window_geom(geom)
    W = geom["in_w"]
    OH, OW = idx.shape[-2], idx.shape[-1]
    if idx.dtype == torch.int64 and idx.is_contiguous() and idx.numel() and backend_for(idx, _lib) == "c":
        out = torch.empty(idx.shape, dtype=torch.int32)
        _lib().fxc_window_local(idx.data_ptr(), idx.numel() // (OH * OW), OH, OW, W, kw, sh, sw, ph, pw, dh, dw,
                                    out.data_ptr())
        return out
    ih, iw = idx // W, idx % W
    oh = torch.arange(OH, device=idx.device).view(-1, 1)
    ow = torch.arange(OW, device=idx.device).view(1, -1)
    return (((ih - oh * sh + ph) // dh) * kw + (iw - ow * sw + pw) // dw).to(torch.int32)


def window_global(local: torch.Tensor, geom: dict, W: int) -> torch.Tensor:
    """window_local's inverse: int64 flat input positions."""
    kw, sh, sw, ph, pw, dh, dw = _window_geom(geom)
    OH, OW = local.shape[-2], local.shape[-1]
    if local.dtype == torch.int32 and local.is_contiguous() and local.numel() \
            and backend_for(local, _lib) == "c":
        out = bufpool.empty(local.shape, torch.int64)
        _lib().fxc_window_global(local.data_ptr(), local.numel() // (OH * OW), OH, OW, W, kw, sh, sw, ph, pw, dh,
                                     dw, out.data_ptr())
        return out
    local = local.to(torch.int64)
    oh = torch.arange(OH, device=local.device).view(-1, 1)
    ow = torch.arange(OW, device=local.device).view(1, -1)
    ih = oh * sh - ph + (local // kw) * dh
    iw = ow * sw - pw + (local % kw) * dw
    return ih * W + iw
