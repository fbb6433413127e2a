"""Shared test helpers: a demo treatment pass and CLI runner."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import List, Literal, Optional

import torch.fx as fx
import torch.nn as nn

from fxcompress.config import ConfigError, check_range
from fxcompress.passes import Pass, PassResult, fxc_name


@dataclass
class DemoConfig:
    bits: int = 8
    rounding: Literal["nearest", "stochastic"] = "nearest"
    scale: float = 1.0
    tags: List[str] = None

    def check(self):
        check_range("bits", self.bits, 1, 16)
        if self.scale <= 0:
            raise ConfigError("scale", f"must be positive, got {self.scale}")


class DemoPass(Pass):
    """Inserts an identity call after each treated weight-layer node: the
    smallest real rewrite, used to test the spine without a method."""

    name = "demo"
    key = "demo"
    config = DemoConfig

    def applies_to(self, node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            return None
        return f"{self.name} applies to Conv2d and Linear modules only"

    def run(self, gm, plan):
        res = PassResult()
        for node, cfg in plan.selected(self.key):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(_fxc_identity, (node,))
                new.name = fxc_name(gm, self.name, node.name)
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            res.inserted.append(new.name)
            res.modified = True
        return res


def _fxc_identity(x):
    return x


def run_cli(argv, passes=None) -> tuple:
    """(exit code, stdout, stderr) of `fxcompress ARGV`, compiling with `passes`."""
    from fxcompress.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv, passes=passes)
        except SystemExit as e:  # argparse exits for --help and usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()
