"""A sparse model on disk: the plain model with its zeros, and a compact file.

The compact file stores every floating tensor with >= 2 dimensions that has
zeros as a bitmask (1 bit per weight, which positions are non-zero) plus the
non-zero values in order, when that is smaller than the dense tensor; every
other tensor as it is. At 90 % sparsity an fp32 weight then costs
1/32 + 0.1 of its dense bytes (about 13 %). `load_compact` rebuilds the exact
dense tensors (bitwise: the values are copied, not recomputed).

`to_semi_structured` converts 2:4-sparse Linear weights to torch's
semi-structured sparse tensors (CUDA with sparse tensor cores only; fp16).
"""
from __future__ import annotations

import io
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

FORMAT = "fxcompress-sparse-1"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return ((bits.view(-1, 1) & _BITS) != 0).reshape(-1)[:numel]


def compact(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    tensors: Dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2:
            nz = v != 0
            kept = int(nz.sum())
            packed_bytes = (v.numel() + 7) // 8 + kept * v.element_size()
            if packed_bytes < v.numel() * v.element_size():
                tensors[k] = {"shape": list(v.shape), "bits": pack_bits(nz), "values": v[nz].clone()}
                continue
        tensors[k] = v
    return {"format": FORMAT, "tensors": tensors}


def expand(obj: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    out = {}
    for k, v in obj["tensors"].items():
        if isinstance(v, dict):
            numel = 1
            for s in v["shape"]:
                numel *= s
            mask = unpack_bits(v["bits"], numel)
            t = torch.zeros(numel, dtype=v["values"].dtype)
            t[mask] = v["values"]
            out[k] = t.view(v["shape"])
        else:
            out[k] = v
    return out


def nbytes(obj) -> int:
    """Bytes of `obj` as torch.save writes it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def save_compact(state: Dict[str, torch.Tensor], path: str) -> int:
    obj = compact(state)
    torch.save(obj, path)
    return nbytes(obj)


def load_compact(path: str) -> Dict[str, torch.Tensor]:
    return expand(torch.load(path, map_location="cpu", weights_only=True))


def sparsity_of(state: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """(zeros, numel) over the floating tensors with >= 2 dimensions."""
    zeros = numel = 0
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2:
            zeros += int((v == 0).sum())
            numel += v.numel()
    return zeros, numel


def to_semi_structured(model: nn.Module) -> Tuple[int, str]:
    """Swap 2:4-sparse Linear weights for torch's semi-structured sparse
    tensors; (how many, why none) — only on CUDA with the support."""
    if not torch.cuda.is_available():
        return 0, "no CUDA device: semi-structured sparse tensors need sparse tensor cores"
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        return 0, "this torch has no torch.sparse.to_sparse_semi_structured"
    done, why = 0, ""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.is_cuda:
            w = m.weight.detach()
            groups = (w.reshape(-1, 4) != 0).sum(1) if w.shape[1] % 4 == 0 else None
            if groups is None or bool((groups > 2).any()):
                continue
            try:
                m.weight = nn.Parameter(to_sparse_semi_structured(w.half() if w.dtype == torch.float32 else w),
                                        requires_grad=False)
                done += 1
            except (RuntimeError, ValueError) as e:
                why = f"{name}: {str(e).splitlines()[0]}"
    return done, why
