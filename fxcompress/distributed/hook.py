"""The DDP communication hook: quantize, all-gather, decode, average.

(No `from __future__ import annotations` here: DDP compares the hook's return
annotation with the real `torch.futures.Future[torch.Tensor]` object.)

Quantized gradients cannot be summed in place (the sum of two codes means
nothing), so each rank encodes its bucket into one uint8 message (codes +
norms, fxcompress/distributed/wire.py), the messages are all-gathered, and
every rank decodes all of them and takes the mean.

Usage:

    state = QuantizedCommState(CommunicationConfig(method="alq", bits=3))
    ddp.register_comm_hook(state, quantized_hook)
    ...
    ckpt["comm"] = state.state_dict()

Levels of the adaptive methods are refit on the schedule in the config: at a
refit iteration every bucket adds its statistics, and when DDP hands over the
iteration's last bucket, rank 0 fits, broadcasts and all ranks check they hold
identical levels before that bucket is encoded.
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import BadInput, RunFailure
from ..kernels import gradquant
from ..kernels.counter_hash import MASK32, mix32
from .config import CommunicationConfig
from .levels import BucketStats
from .quantizers import Quantizer


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B9
    for part in parts:
        h = mix32(h ^ (part & MASK32))
    return h & 0x7FFFFFFF


class QuantizedCommState:
    """Everything the hook keeps between calls; its `state_dict` belongs in the
    training checkpoint so a resumed run keeps its learned levels, its refit
    position and its random stream."""

    def __init__(self, config: Optional[CommunicationConfig] = None, process_group=None):
        self.config = config or CommunicationConfig()
        self.process_group = process_group
        self.quantizer = None if self.config.full_precision else Quantizer.from_config(self.config)
        self.iteration = 0
        self.refits: List[Dict] = []
        self._stats: List[BucketStats] = []
        # DDP rebuilds its buckets (new order, new sizes) after the first
        # iteration, so anything keyed by bucket index is only trusted from
        # iteration 1 on, and re-checked against the bucket's size
        self._gather_buffers: Dict[int, torch.Tensor] = {}
        self._message_buffers: Dict[int, torch.Tensor] = {}
        self.wire_bytes_step = 0   # bytes this rank sent in the last complete step
        self.fp32_bytes_step = 0   # what a full-precision all-reduce of the same buckets would send
        self._wire_acc = 0
        self._fp32_acc = 0

    # -------------------------------------------------------- properties
    @property
    def group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def levels(self):
        return None if self.quantizer is None else self.quantizer.levels

    def compression_ratio(self) -> float:
        return self.fp32_bytes_step / self.wire_bytes_step if self.wire_bytes_step else 1.0

    def figures(self) -> Dict[str, float]:
        """For the run report: bytes this rank sends per step, and vs fp32."""
        return {"comm.wire_bytes_per_step": float(self.wire_bytes_step),
                "comm.fp32_bytes_per_step": float(self.fp32_bytes_step),
                "comm.compression_vs_fp32": self.compression_ratio(),
                "comm.refits": float(len(self.refits))}

    def refit_due(self) -> bool:
        return self.quantizer is not None and self.quantizer.adaptive and self.config.refit.due(self.iteration)

    def seed_for(self, bucket_index: int) -> int:
        """A different random stream for every (step, bucket, rank): errors of
        different ranks must be independent to average down."""
        return _mix_seed(self.config.seed, self.iteration, bucket_index, self.rank)

    # ------------------------------------------------------------- refit
    def refit(self) -> None:
        """Fit on rank 0, broadcast, then prove every rank holds the same levels."""
        q = self.quantizer
        n = len(q.levels)
        payload = torch.zeros(2 + n, dtype=torch.float64)
        error = None
        if self.rank == 0:
            try:
                q.fit(BucketStats.concat(self._stats))
            except BadInput:
                pass  # an all-zero gradient says nothing about the distribution: keep the levels
            except Exception as e:  # the other ranks are already waiting in the broadcast
                error = f"{type(e).__name__}: {e}"
            payload[0] = -1.0 if error else float(self.iteration)
            payload[1] = float("nan") if q.p is None else q.p
            payload[2:] = torch.as_tensor(q.levels, dtype=torch.float64)
        self._stats = []
        dist.broadcast(payload, src=dist.get_global_rank(self.group, 0), group=self.group)
        if payload[0] < 0:
            raise RunFailure(f"refitting the {q.method} levels on rank 0 at iteration {self.iteration} failed"
                             + (f": {error}" if error else ""))
        p = None if torch.isnan(payload[1]) else float(payload[1])
        q.set_levels(payload[2:].numpy().copy())
        q.p = p
        if self.config.verify_levels:
            self._verify(payload)
        self.refits.append({"iteration": self.iteration, "levels": [float(v) for v in q.levels], "p": p})

    def _verify(self, payload: torch.Tensor) -> None:
        # max == min == mine on every rank <=> all ranks hold the same bits;
        # the iteration rides along so a rank that skipped a step is caught too
        mine = payload.clone()
        mine[1] = torch.nan_to_num(mine[1], nan=-2.0)
        hi, lo = mine.clone(), mine.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        if not (torch.equal(hi, mine) and torch.equal(lo, mine)):
            raise RunFailure(f"rank {self.rank}: quantization levels differ between ranks after the refit "
                             f"at iteration {self.iteration}")

    # ----------------------------------------------------- bookkeeping
    def _gather_buffer(self, bucket_index: int, world: int, nbytes: int, device) -> torch.Tensor:
        buf = self._gather_buffers.get(bucket_index) if self.iteration >= 1 else None
        if buf is None or buf.numel() != world * nbytes or buf.device != device:
            # flat: gloo's all_gather_into_tensor splits a 1-D output by rank
            buf = torch.empty(world * nbytes, dtype=torch.uint8, device=device)
            if self.iteration >= 1:
                self._gather_buffers[bucket_index] = buf
        return buf

    def _message_buffer(self, bucket_index: int, nbytes: int, device) -> Optional[torch.Tensor]:
        """This bucket's message from the last step, to encode into again (a
        fresh buffer every step is fresh pages, which cost more than the
        encode); None in the first iteration, while DDP's buckets settle. The
        last step's all-gather has read it: DDP waits for every bucket's
        future before the optimizer step."""
        if self.iteration < 1:
            return None
        buf = self._message_buffers.get(bucket_index)
        if buf is None or buf.numel() != nbytes or buf.device != device:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._message_buffers[bucket_index] = buf
        return buf

    def _end_bucket(self, is_last: bool, wire: int, fp32: int) -> None:
        self._wire_acc += wire
        self._fp32_acc += fp32
        if is_last:
            self.wire_bytes_step, self.fp32_bytes_step = self._wire_acc, self._fp32_acc
            self._wire_acc = self._fp32_acc = 0
            self.iteration += 1

    # ------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "method": self.config.method,
            "bits": None if self.quantizer is None else self.quantizer.bits,
            "iteration": self.iteration,
            "quantizer": None if self.quantizer is None else self.quantizer.state_dict(),
            "refits": list(self.refits),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.config.method:
            raise RunFailure(f"checkpoint's communication method {state.get('method')!r} "
                             f"differs from the policy's {self.config.method!r}")
        self.iteration = int(state["iteration"])
        self.refits = list(state.get("refits", []))
        if self.quantizer is not None and state.get("quantizer"):
            self.quantizer.load_state_dict(state["quantizer"])
        self._gather_buffers.clear()  # a resumed DDP builds its buckets afresh
        self._message_buffers.clear()


def quantized_hook(state: QuantizedCommState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook (`ddp.register_comm_hook(state, quantized_hook)`)."""
    buf = bucket.buffer()
    world = state.world_size
    if state.quantizer is None:
        return _allreduce_mean(state, bucket, buf, world)
    q = state.quantizer
    if state.refit_due():
        if state.rank == 0:  # only rank 0 fits; the others receive its levels
            state._stats.append(q.stats(buf))
        if bucket.is_last():
            state.refit()
    levels = q.levels32.to(buf.device)  # the levels this bucket is encoded with, even if a refit follows
    numel = buf.numel()
    nbytes = q.layout(numel).nbytes
    msg = gradquant.encode(buf.reshape(-1), levels, q.bits, q.bucket_size, q.norm, state.seed_for(bucket.index()),
                           out=state._message_buffer(bucket.index(), nbytes, buf.device))
    gathered = state._gather_buffer(bucket.index(), world, nbytes, buf.device)
    work = _all_gather(gathered, msg, state.group)
    state._end_bucket(bucket.is_last(), nbytes, 4 * numel)

    def finish(fut):
        # the mean straight into the bucket (the gathered messages are a
        # buffer of their own, so nothing is overwritten before it is read)
        if buf.dtype == torch.float32 and buf.is_contiguous():
            gradquant.decode(gathered.view(world, -1), levels, q.bits, numel, q.bucket_size, out=buf.view(-1))
        else:
            buf.copy_(gradquant.decode(gathered.view(world, -1), levels, q.bits, numel, q.bucket_size).view(buf.shape))
        return buf

    return work.get_future().then(finish)


def _all_gather(out: torch.Tensor, msg: torch.Tensor, group):
    # all_gather_into_tensor is deprecated in newer torch in favour of all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, msg, group=group, async_op=True)


def _allreduce_mean(state: QuantizedCommState, bucket, buf: torch.Tensor, world: int):
    state._end_bucket(bucket.is_last(), 4 * buf.numel(), 4 * buf.numel())
    buf.div_(world)
    work = dist.all_reduce(buf, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def register(ddp_model, config: Optional[CommunicationConfig] = None, process_group=None) -> QuantizedCommState:
    """Install the hook on a DistributedDataParallel model; returns its state."""
    state = QuantizedCommState(config, process_group)
    ddp_model.register_comm_hook(state, quantized_hook)
    return state


def wrap(model: torch.nn.Module, config: Optional[CommunicationConfig] = None, device=None, process_group=None,
         **ddp_kwargs):
    """DistributedDataParallel(model) with the policy's communication hook.
    Call after the process group is up (launch.init_from_env or inside
    run_data_parallel). Returns (ddp_model, state)."""
    if device is not None and torch.device(device).type == "cuda":
        model = model.to(device)
        ddp_kwargs.setdefault("device_ids", [torch.device(device).index or 0])
    ddp = DDP(model, process_group=process_group, **ddp_kwargs)
    return ddp, register(ddp, config, process_group)
