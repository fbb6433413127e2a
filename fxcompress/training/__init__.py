"""The training loop behind `fxcompress train`: a model, a policy, real data.

One run = seed, build the model, compile it with the policy (if any), train
with SGD/Adam under a step or cosine schedule, evaluate each epoch, and keep a
run directory:

    RUN_DIR/report.json     config, data, model, every figure of every epoch
    RUN_DIR/checkpoint.pt   written after each epoch; resumes the run exactly
    RUN_DIR/final_model.pt  the trained weights (state_dict)
    RUN_DIR/models/L.pt     snapshots a controller asked for (snapshot_due), same format
    RUN_DIR/plots/*.png     curves, method figures, per-layer pictures
    RUN_DIR/baseline/...    the same for the uncompressed baseline (--baseline)

Data-parallel (`nproc > 1`, or under torchrun): N workers joined by
torch.distributed (gloo on CPU, NCCL on GPU) train one model through
DistributedDataParallel, with the policy's `communication:` section as the
DDP comm hook (fxcompress/distributed; full-precision all-reduce when the
policy has none, and for the baseline). `batch_size` stays the global batch:
each worker takes `batch_size // nproc` images a step from its shard of the
same seeded epoch permutation, so a run has the number of steps, learning-rate
schedule and averaged gradient of the single-process run. Only rank 0 writes
the run directory and evaluates (the model it saves is the one it tests);
per-epoch figures add the bytes each worker puts on the wire per step beside
what fp32 would send. A checkpoint holds every rank's RNG state and the hook's
state (learned levels, refit position), so a stopped run resumes where it
left off. Bitwise equal to an uninterrupted run with fp32 all-reduce; with a
quantizing hook not quite, because a fresh DDP hands its first step's
gradients over in its initial bucket layout (parameter order), which the
uninterrupted run had already rebuilt, so that one step quantizes other
buckets with other random streams.

Determinism: the data order and the augmentation of epoch e come from
generators seeded by (seed, e), not from a running stream, and the global
RNGs are saved in each checkpoint; so a run stopped after any epoch and
resumed ends bitwise equal to one that never stopped (on CPU), and a baseline
sees exactly the batches the compressed run saw.

Controllers are driven duck-typed (`attach_optimizer`, `on_epoch_start`,
`step`, `on_epoch_end`, `figures`), so a plain nn.Module trains too.

The package, one seam a module:
    config      TrainConfig, its checks, the device
    seeds       seeds derived per (seed, epoch, stream); RNG state as plain values
    hooks       how the loop calls a model's controllers
    build       data, model, optimizer, compiled model, DDP wrapper: a Run
    loop        learning-rate schedule, epochs and steps, evaluation
    checkpoint  checkpoint.pt and final_model.pt: write, read, restore
    rundir      the run directory: its name, report.json, plots, the comparison table
    launch      train()/resume(): one process, spawned workers, or torchrun's rank
"""
from .build import Run, build_data, build_model, check_model_fits, make_optimizer, model_channels, prepare_run
from .checkpoint import (CHECKPOINT, FINAL_MODEL, FORMAT, MODELS_DIR, load_checkpoint, original_names, read_pt,
                         read_weights, restore, save_checkpoint, snapshots, weights_path)
from .config import DIGITS_DEFAULT_UPSCALE, OPTIMIZERS, SCHEDULES, TrainConfig, check_config, resolve_device
from .launch import StreamLog, resume, train
from .loop import EpochFigures, decay_epochs, epoch_line, evaluate, execute, lr_at, train_epoch
from .rundir import (BASELINE_DIR, REPORT, comparison_rows, comparison_table, describe_run, finish, new_run_dir,
                     run_report, summarise, write_json)
from .seeds import derived_seed, rng_state, seed_everything, set_rng_state

__all__ = ["BASELINE_DIR", "CHECKPOINT", "DIGITS_DEFAULT_UPSCALE", "EpochFigures", "FINAL_MODEL", "FORMAT",
           "MODELS_DIR", "OPTIMIZERS", "REPORT", "Run", "SCHEDULES", "StreamLog", "TrainConfig", "build_data",
           "build_model", "check_config", "check_model_fits", "comparison_rows", "comparison_table", "decay_epochs",
           "derived_seed", "describe_run", "epoch_line", "evaluate", "execute", "finish", "load_checkpoint", "lr_at",
           "make_optimizer", "model_channels", "new_run_dir", "original_names", "prepare_run", "read_pt",
           "read_weights", "resolve_device", "restore", "resume", "rng_state", "run_report", "save_checkpoint",
           "seed_everything", "set_rng_state", "snapshots", "summarise", "train", "train_epoch", "weights_path",
           "write_json"]
