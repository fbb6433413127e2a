"""Building a run: data, model, optimizer, the compiled model and, under
torch.distributed, its DDP wrapper."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Subset

from ..compiled import compile as fx_compile
from ..data import load_data, parse_spec
from ..distributed import CommunicationConfig
from ..distributed.hook import wrap
from ..errors import BadInput
from ..loading import build_torchvision, load_model
from ..models import default_model
from ..passes import resolve_passes
from ..policy import load_policy
from .checkpoint import CHECKPOINT, load_init, weights_path
from .config import DIGITS_DEFAULT_UPSCALE, TrainConfig, resolve_device
from .hooks import hook
from .rundir import jsonable
from .seeds import derived_seed, seed_everything


def build_data(cfg: TrainConfig, channels: Optional[int] = None):
    kind, _ = parse_spec(cfg.data)
    upscale = cfg.upscale
    if upscale is None and kind == "digits":
        upscale = DIGITS_DEFAULT_UPSCALE
    bundle = load_data(cfg.data, upscale=upscale, channels=channels)
    if cfg.train_limit:
        bundle.train = _limit(bundle.train, cfg.train_limit)
    if cfg.test_limit:
        bundle.test = _limit(bundle.test, cfg.test_limit)
    return bundle


def _limit(ds, n: int):
    return ds if n >= len(ds) else Subset(ds, list(range(n)))


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    return build_torchvision(name, num_classes=num_classes)[0]


def model_channels(cfg: TrainConfig) -> Optional[int]:
    """torchvision models expect RGB: grey data is repeated into 3 channels for them."""
    return 3 if cfg.model and cfg.model.startswith("torchvision:") else None


def build_model(cfg: TrainConfig, bundle) -> Tuple[nn.Module, Dict[str, Any]]:
    if cfg.model is None:
        return default_model(bundle, cfg.depth), {"kind": "builtin", "name": f"resnet{cfg.depth}_cifar",
                                                  "depth": cfg.depth}
    if cfg.model.startswith("torchvision:"):
        name = cfg.model.split(":", 1)[1]
        return _torchvision_model(name, bundle.num_classes), {"kind": "torchvision", "name": name}
    loaded = load_model(cfg.model, cfg.model_fn)
    return loaded.model, loaded.source


def check_model_fits(model: nn.Module, example: torch.Tensor, num_classes: int, what: str) -> None:
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as e:
        raise BadInput(f"{what} fails on a data batch of shape {tuple(example.shape)}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''} (try --upscale or another --data)") from None
    finally:
        model.train()
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape != (example.shape[0], num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise BadInput(f"{what} returns {shape} for a batch of {example.shape[0]}; "
                       f"training needs logits of shape ({example.shape[0]}, {num_classes}) for this data")


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@dataclass
class Run:
    """Everything one training run holds; `history` is the per-epoch record."""

    cfg: TrainConfig
    label: str
    run_dir: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    bundle: Any
    device: torch.device
    source: Dict[str, Any]
    compressed: bool
    history: List[Dict[str, Any]] = field(default_factory=list)
    compile_report: Optional[Dict[str, Any]] = None
    # data-parallel: the DDP wrapper trained through, the comm hook's state
    ddp: Optional[nn.Module] = None
    comm: Any = None
    rank: int = 0
    world: int = 1
    backend: Optional[str] = None
    # --init: where the starting weights came from, what was missing or unexpected
    init: Optional[Dict[str, Any]] = None
    init_line: Optional[str] = None


def prepare_run(cfg: TrainConfig, run_dir: str, label: str, use_policy: bool, bundle=None,
                passes: Optional[Tuple[type, ...]] = None) -> Run:
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    bundle = bundle or build_data(cfg, model_channels(cfg))
    # Seed right before building, so the compressed model and its baseline
    # start from the same initial weights.
    seed_everything(cfg.seed)
    model, source = build_model(cfg, bundle)
    what = f"model {source.get('name') or source.get('path')}"
    example = bundle.example_batch(2)
    check_model_fits(model, example, bundle.num_classes, what)
    compressed = bool(use_policy and cfg.policy)
    init = init_line = init_path = None
    if cfg.init and not os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        # (a run that resumes from its checkpoint needs no starting weights)
        # before compiling, so that the passes see the trained weights ...
        init_path = weights_path(cfg.init, "--init")
        init, init_line = load_init(model, init_path, compiled=False)
    compile_report = None
    if compressed:
        model = fx_compile(model, cfg.policy, (example,), passes=passes)
        compile_report = hook(model, "report")
        if init_path:  # ... and after, for what the passes keep under the same names
            init, init_line = load_init(model, init_path, compiled=True)
    model = model.to(device)
    if cfg.compile:
        if compressed:
            model.compile_with(cfg.compile)
        else:
            model.compile(backend=cfg.compile, dynamic=False)  # in place: state_dict names unchanged
    optimizer = make_optimizer(cfg, model.parameters())
    hook(model, "attach_optimizer", optimizer)
    run = Run(cfg, label, run_dir, model, optimizer, bundle, device, source, compressed,
              compile_report=jsonable(compile_report), init=init, init_line=init_line)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        comm = communication(cfg, passes) if use_policy else None
        # the baseline, and a policy without a communication: section, all-reduce in fp32
        comm = comm or CommunicationConfig(method="fp32")
        run.ddp, run.comm = wrap(model, comm, device)
        run.rank, run.world, run.backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    # Whatever the compiler drew from the RNG, training starts from one state
    # (on each rank its own: stochastic methods must not draw alike on all).
    seed_everything(derived_seed(cfg.seed, 0, 2) if run.rank == 0 else derived_seed(cfg.seed, 0, 20_000 + run.rank))
    return run


def communication(cfg: TrainConfig, passes: Optional[Tuple[type, ...]] = None):
    """The policy's `communication:` section, or None."""
    if not cfg.policy:
        return None
    return load_policy(cfg.policy, resolve_passes(passes)).section("communication")
