#!/usr/bin/env python
"""The 1-bit path's conv on bits (kernels/binary_conv_cpu.c) against torch's
fp32 conv of the same 0/1 inputs and +-s weights, per CIFAR-ResNet shape.

    .venv/bin/python tools/bench_binary_conv.py [--batch 256] [--reps 20] [--threads N] [--json F]

Wall time at torch's default thread count unless --threads; the two are
alternated rep by rep in one process, medians reported, and the outputs are
checked to agree before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fxcompress.kernels import binary_conv  # noqa: E402
from fxcompress.quantizers.dorefa import quantize_weight  # noqa: E402

#: (channels, side, stride): the 3x3 convs of a CIFAR ResNet's three stages at 32px, and the stride-2 entries
SHAPES = [(16, 32, 1), (32, 16, 1), (64, 8, 1), (16, 32, 2), (32, 16, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own, every core)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if binary_conv._lib() is None:
        print("the C kernel did not build (no C compiler?): nothing to compare", file=sys.stderr)
        return 1
    rows = []
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, medians of {args.reps} alternated reps")
    print(f"{'in ch':>5} {'out ch':>6} {'side':>4} {'stride':>6} {'bits ms':>8} {'fp32 ms':>8} {'fp32 / bits':>11}")
    g = torch.Generator().manual_seed(0)
    for c, side, stride in SHAPES:
        co = c * stride  # a stride-2 entry doubles the channels, as the ResNet does
        x = (torch.rand(args.batch, c, side, side, generator=g) > 0.5).float()
        w = quantize_weight(torch.randn(co, c, 3, 3, generator=g), 1)
        with torch.no_grad():
            a = binary_conv.binary_conv2d(x, w, None, stride, 1)
            b = F.conv2d(x, w, None, stride, 1)
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())):
                print(f"kernel disagrees with torch at {c}x{side} stride {stride}", file=sys.stderr)
                return 1
            times = {"bits": [], "fp32": []}
            for _ in range(args.reps):
                for name, fn in (("bits", binary_conv.binary_conv2d), ("fp32", F.conv2d)):
                    t0 = time.perf_counter()
                    fn(x, w, None, stride, 1)
                    times[name].append(time.perf_counter() - t0)
        bits_ms, fp_ms = (1000 * statistics.median(times[k]) for k in ("bits", "fp32"))
        rows.append({"in": c, "out": co, "side": side, "stride": stride, "bits_ms": bits_ms, "fp32_ms": fp_ms,
                     "speedup": fp_ms / bits_ms})
        print(f"{c:>5} {co:>6} {side:>4} {stride:>6} {bits_ms:>8.2f} {fp_ms:>8.2f} {fp_ms / bits_ms:>10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "threads": torch.get_num_threads(), "reps": args.reps, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
