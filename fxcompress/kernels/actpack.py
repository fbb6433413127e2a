"""Activation packing (AC-GC): the public names of the packing families.

Each family lives in its own file; this module only gathers their public
names, so the runtime has one import for everything it stores:
    rounding.py      the quantizer's arithmetic (scales, codes, slices,
                     the counter-based random stream)
    fixed_width.py   one width for the whole tensor; the raw code packer
    bitmask.py       1-bit masks (booleans, x > thr)
    zvc.py           zero-value compression at one width
    mixed_width.py   per-channel widths (AutoQuant)
    mixed_zvc.py     per-channel widths, zeros given by a shared mask
    auto_pack.py     AutoQuant's widths, groups and codes of a tensor in
                     two C calls (the two above, without their Python)
    window_index.py  max-pool indices as window slots
    actpack_cpu.py   the C loops (actpack_cpu.c) all of them share
Which path runs (Triton, C, torch reference) is decided in dispatch.py.
"""
from .auto_pack import PackedAuto, auto_pack, auto_unpack  # noqa: F401
from .bitmask import (PackedMask, pack_mask, pack_mask_gt, pack_mask_gt_stats, unpack_mask,  # noqa: F401
                      unpack_mask_values)
from .fixed_width import (Packed, pack_codes, quant_pack, stats, stats_nnz, unpack, unpack_codes,  # noqa: F401
                          view3)
from .mixed_width import PackedMixed, mixed_pack, mixed_unpack  # noqa: F401
from .mixed_zvc import PackedMixedZVC, mixed_zvc_pack, mixed_zvc_unpack  # noqa: F401
from .rounding import (EPS, ROUNDINGS, SIGNED_ALL, SIGNED_ZERO, UNSIGNED, check_bits, grid, grid_kind, mix_seed,  # noqa: F401
                       multipliers, slices, uniform_reference)
from .window_index import window_global, window_local  # noqa: F401
from .zvc import PackedZVC, zvc_pack, zvc_unpack  # noqa: F401
