import os

import torch

import fxcompress
from fxcompress.plots import per_layer_tables, plot_layers
from tests.models.small_cnn import SmallCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layers_plot_shows_every_treated_layer(tmp_path):
    # issue 11: layers.png showed AutoQuant's measured_bits of a few probed
    # nodes only, not what every treated layer stores
    torch.manual_seed(0)
    cm = fxcompress.compile(SmallCNN(), os.path.join(ROOT, "policies", "psgd_w4_acgc_auto.yaml"),
                            torch.randn(2, 3, 16, 16)).train()
    cm(torch.randn(4, 3, 16, 16)).square().mean().backward()
    reports = {n: c.report() for n, c in cm.controllers.items()}
    reports["sparsity"] = {"layer_columns": {"sparsity": {"conv1": 0.5, "fc": 0.9}}}  # a later method's hook
    tables = per_layer_tables(reports)
    names = list(tables)
    stored = tables["activations: stored bits per element (last forward)"]
    treated = {e.name.replace("fxc_save_", "") for e in cm.plan.selected_entries if "activations" in e.treatments}
    ledger = {n for c in reports.values() for n, d in (c.get("nodes") or {}).items() if d["fp32_bytes"]}
    # every node that stored a tensor in the last forward (tiny ones are kept as they are, unledgered;
    # a tensor another node stored already counts there)
    assert set(stored) == ledger and ledger <= treated and len(stored) >= 5
    assert stored["relu"] == 1.0 and 8 <= stored["conv2d"] <= 9  # ReLU's 1-bit mask; 8 bits plus scales
    psgd = tables["scaled_grad: bits per weight"]
    assert set(psgd) == {"conv1.weight", "conv2.weight", "fc.weight"} and set(psgd.values()) == {4.0}
    assert names.index("sparsity: sparsity") > names.index("scaled_grad: bits per weight")
    assert set(names[:2]) == {"activations: stored bits per element (last forward)", "scaled_grad: bits per weight"}
    path = plot_layers(reports, str(tmp_path / "layers.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
