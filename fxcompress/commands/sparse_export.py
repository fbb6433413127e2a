"""fxcompress sparse-export RUN_DIR|CHECKPOINT [-o DIR]: the sparse model of an AC/DC run, on disk.

Writes DIR/model_with_zeros.pt (the original model's state_dict, pruned
weights stored as zeros: loads into the plain model) and DIR/model_sparse.pt
(bitmask + non-zero values per sparse weight, fxcompress/sparse_export.py),
and reports both sizes against the dense bytes. With --check (default on)
it reloads the compact file and compares it bitwise with the weights.
"""
from __future__ import annotations

import argparse
import os

import torch

from ..errors import BadInput
from ..sparse_export import compact, expand, nbytes, save_compact, sparsity_of
from ..training.checkpoint import read_weights
from .common import add_json_arg, print_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sparse-export", help="write an AC/DC run's sparse model: with zeros, and compact",
                       description="Write the sparse model of a run (RUN_DIR/models/sparse.pt when the run saved "
                       "one, else final_model.pt; or a given checkpoint) as a plain state_dict with zeros and as "
                       "a compact bitmask + values file, and report their bytes against dense.")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("-o", "--out", help="output directory (default RUN_DIR/export)")
    p.add_argument("--weights", default="sparse", help="which model of the run: sparse (default), final, or a "
                   "label the run saved under RUN_DIR/models/")
    add_json_arg(p)
    return p


def _source(source: str, weights: str):
    if os.path.isdir(source):
        cands = [os.path.join(source, "models", f"{weights}.pt")] if weights != "final" else []
        cands.append(os.path.join(source, "final_model.pt"))
        for c in cands:
            if os.path.isfile(c):
                return source, c
        raise BadInput(f"{source}: no {' or '.join(os.path.relpath(c, source) for c in cands)} there")
    if os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source)), source
    raise BadInput(f"{source}: no such run directory or checkpoint file")


def run(args) -> int:
    run_dir, path = _source(args.source, args.weights)
    state = read_weights(path, "weights file")
    out = args.out or os.path.join(run_dir, "export")
    os.makedirs(out, exist_ok=True)
    plain = os.path.join(out, "model_with_zeros.pt")
    torch.save(state, plain)
    packed = os.path.join(out, "model_sparse.pt")
    compact_bytes = save_compact(state, packed)
    back = expand(compact(state))
    same = set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    if not same:
        raise BadInput(f"{path}: the compact file does not reproduce the weights (a bug; please report it)")
    zeros, numel = sparsity_of(state)
    dense_bytes = nbytes(state)
    result = {"weights": path, "with_zeros": plain, "compact": packed, "dense_bytes": dense_bytes,
              "compact_bytes": compact_bytes, "ratio": compact_bytes / dense_bytes,
              "weight_sparsity": zeros / max(numel, 1)}
    if args.json:
        print_json(result)
    else:
        print(f"{path}: weight sparsity {100 * result['weight_sparsity']:.2f}%")
        print(f"  {plain}: {dense_bytes} bytes (dense, zeros stored)")
        print(f"  {packed}: {compact_bytes} bytes ({100 * result['ratio']:.1f}% of dense; reloads bitwise equal)")
    return 0
