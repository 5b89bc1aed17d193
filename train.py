"""Pretrain SparseMedicalViT with LeJEPA on a mixed 2D/3D stream (paper 2.2-2.4).

    python train.py --stage 3                          # one process (CPU demo on phantoms)
    torchrun --nproc_per_node=8 train.py --stage 3     # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 train.py --stage 3 --data CACHE_2D CACHE_3D

Stage 1: 2D only from scratch. Stage 2: from a stage-1 checkpoint (--init) on
the mixed stream. Stage 3: mixed stream from scratch. --objective supervised
trains the same backbone with a linear head on the five labels.

The content of step s (samples, crops, drop-path draws) is a function of
(seed, s, rank) alone, so a resumed run continues exactly as if it had never
stopped, and N processes see the same global batch as one.

Imports data, views (the batches), budget (a step's memory, checked before it runs), signals (Ctrl-C and
SIGTERM), lejepa and model; bench.py imports this module for its step.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

import data
import lejepa
from budget import check_step_memory
from signals import StopNow, StopSignals, announcer
from model import CKPT_FORMAT, PRESETS, Projector, SparseMedicalViT, load_checkpoint, model_flops_per_token
from views import make_loader

STAGE_BATCH = {1: (256, 0), 2: (192, 64), 3: (192, 64)}  # paper 2.4: (2D, 3D) samples per step
PAPER_DEFAULTS = dict(model="small", depth=None, steps=100_000, size_2d=224, size_3d=112, n_2d=20_000, n_3d=5_000,
                      log_every=20)
# Without CUDA, phantoms or caches alike: the paper's 256 samples per step need tens of GB there (issue 24)
CPU_DEMO = dict(model="tiny", depth=6, steps=100, size_2d=112, size_3d=56, n_2d=512, n_3d=256, log_every=10)
CPU_DEMO_BATCH_DIVISOR = 8  # the paper's batches / 8: 32 samples per step, same 2D:3D ratio
PHANTOM_ONLY = ("size_2d", "size_3d", "n_2d", "n_3d")  # flags that shape the phantoms and mean nothing for a cache
PROBE_LR = 1e-3  # online linear probe's AdamW learning rate, as the official LeJEPA example
COLLAPSE_RANK, COLLAPSE_LOGS = 1.5, 3  # projector rank below this for this many logged steps: say so


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="1: 2D only; 2: mixed from --init; 3: mixed from scratch (default: %(default)s)")
    p.add_argument("--objective", choices=("lejepa", "supervised"), default="lejepa", help="LeJEPA (paper 2.2) or the supervised baseline (default: %(default)s)")
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help="model size (default: small; tiny without CUDA)")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth (default: the preset's; 6 without CUDA)")
    p.add_argument("--proj-hidden", type=int, default=2048, help="projector hidden width (the paper names no projector; default: %(default)s)")
    p.add_argument("--proj-norm", choices=("layer", "batch"), default="batch",
                   help="the projector's normalization: BatchNorm over the step's views, as the official LeJEPA "
                        "example (model.BatchNorm: the global batch's statistics under DDP, each micro-batch's under "
                        "--accum), or per-sample LayerNorm; the paper names neither, and BatchNorm measured better "
                        "(results/recipe; default: %(default)s)")
    p.add_argument("--proj-out", type=int, default=128, help="projector output size K, where the LeJEPA loss is computed (default: %(default)s)")
    p.add_argument("--data", nargs="+", default=["phantom"], help="'phantom' or cache dirs from `python data.py prepare` (2D and/or 3D; default: phantom)")
    p.add_argument("--size-2d", type=int, default=None, help="phantom 2D long side (default 224; 112 on a CPU demo)")
    p.add_argument("--size-3d", type=int, default=None, help="phantom 3D long side (default 112; 56 on a CPU demo)")
    p.add_argument("--n-2d", type=int, default=None, help="phantom 2D training images (default 20000; 512 on a CPU demo)")
    p.add_argument("--n-3d", type=int, default=None, help="phantom 3D training volumes (default 5000; 256 on a CPU demo)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100000; 100 without CUDA)")
    p.add_argument("--batch-2d", type=int, default=None,
                   help="global 2D samples per step (default: the paper's 192, 256 for --stage 1; divided by 8 "
                        "without CUDA: 24, 32)")
    p.add_argument("--batch-3d", type=int, default=None,
                   help="global 3D samples per step (default: the paper's 64, 0 for --stage 1; divided by 8 "
                        "without CUDA: 8)")
    p.add_argument("--n-global", type=int, default=2, help="global views per sample, V_g (paper 2.4.1; default: %(default)s)")
    p.add_argument("--n-local", type=int, default=8, help="local views per sample, V_l (paper 2.4.1; default: %(default)s)")
    p.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=False,
                   help="also brightness/contrast jitter, blur and solarization of every view, as the official LeJEPA "
                        "example (views.photometric; the paper names only the crops, and on phantoms it cost 2D "
                        "AUROC: results/recipe; default: off)")
    p.add_argument("--local-grid", type=int, default=0,
                   help="resize every local crop to this many patches per axis, as the official LeJEPA example "
                        "resizes its local crops (the paper keeps native resolution; default: 0, native)")
    p.add_argument("--zoom", type=float, default=0.0,
                   help="rescale every view by its own factor, log-uniform in [1/ZOOM, ZOOM], so the anatomy's "
                        "apparent size differs between views of one image (views.make_views; beyond the paper, which "
                        "keeps native resolution: results/nuisance; default: 0, off)")
    p.add_argument("--gamma", type=float, default=0.0,
                   help="vary each view's intensity calibration: x^g on [0, 1], log g uniform in +-log(1 + GAMMA) "
                        "(views.gamma_jitter; beyond the paper; default: 0, off)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=False,
                   help="scale each modality's intensities to zero mean and unit variance (statistics of 64 training "
                        "samples, kept in the checkpoint) before the shared patch embedding; the paper feeds its "
                        "[-1, 1] inputs as they are (default: off)")
    p.add_argument("--paired-views", type=int, default=0,
                   help="beyond the paper: this many of each CT sample's local views are crops of its DRR (drr.py), "
                        "so a patient's radiograph and CT are pulled together (views.py; default: 0, the paper's method)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (paper 2.4; default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine decay (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay, not on norms and biases (paper 2.4; default: %(default)s)")
    p.add_argument("--lambd", type=float, default=None,
                   help="SIGReg weight lambda (paper 2.2, 2.4: 0.025 at 256 samples per step). Default: the paper's "
                        "balance at this run's batch, lejepa.balanced_lambd (0.025 at 256, 0.17 at the CPU demo's 32)")
    p.add_argument("--slices", type=int, default=256,
                   help="SIGReg's random directions per step (the official minimal example's 256; its library uses "
                        "1024; default: %(default)s)")
    p.add_argument("--centroid", choices=("global", "all"), default="global",
                   help="the prediction target: the centroid of the global views (paper 2.2) or of all views (the "
                        "official minimal example; default: %(default)s)")
    p.add_argument("--sigreg-per", choices=("batch", "modality"), default="batch",
                   help="SIGReg on the whole mixed batch (paper 2.2) or on each modality's samples apart, summed "
                        "(beyond the paper: each modality must look Gaussian alone; results/nuisance; default: %(default)s)")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (per view; default: %(default)s)")
    p.add_argument("--clip", type=float, default=0.0, help="clip the gradient norm to this value (0: off; default: %(default)s)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps per optimizer step (default: %(default)s)")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "varlen", "flash", "flex"), help="attention backend (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing per block: less memory, ~30%% more compute")
    p.add_argument("--out", default=None, help="folder for checkpoints and logs (default: runs/stage<--stage>, runs/stage<--stage>-supervised for --objective supervised)")
    p.add_argument("--init", default=None, help="stage-1 checkpoint to start stage 2 from")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint in --out) or a checkpoint path")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write a checkpoint every this many steps, and at the end (default: %(default)s)")
    p.add_argument("--stop-at", type=int, default=None, help="checkpoint and exit after this step (job time limits); resume with --resume auto")
    p.add_argument("--log-every", type=int, default=None, help="log metrics every this many steps, and the first step of a run (default 20; 10 without CUDA)")
    p.add_argument("--max-bad-steps", type=int, default=10, help="stop after this many non-finite steps in a row (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order, the crops and the phantoms (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers per process (default: 0 on CPU, 8 on GPU)")
    args = p.parse_args(argv)
    if args.out is None:  # one folder per stage: a stage-1 run never resumes into a stage-3 run's checkpoint
        args.out = f"runs/stage{args.stage}" + ("-supervised" if args.objective == "supervised" else "")
    return args


def resolve_defaults(args, cuda: bool) -> list[str]:
    """Fill the flags left unset: the paper's defaults, or without CUDA a CPU demo that finishes in minutes on
    2 cores (tiny model, the paper's batches / 8; on phantoms also small phantoms), said in the first line."""
    phantom = args.data == ["phantom"]
    demo = {} if cuda else {k: v for k, v in CPU_DEMO.items() if phantom or k not in PHANTOM_ONLY}
    b2, b3 = (b // (1 if cuda else CPU_DEMO_BATCH_DIVISOR) for b in STAGE_BATCH[args.stage])
    if not cuda:
        demo.update(batch_2d=b2, batch_3d=b3)
    chosen = []
    for key, value in {**PAPER_DEFAULTS, "batch_2d": b2, "batch_3d": b3, **demo}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            if key in demo:
                chosen.append(f"{key}={value}")
    if args.lambd is None:  # SIGReg is N-scaled: the paper's lambda means the paper's balance only at its batch
        args.lambd = lejepa.balanced_lambd(args.batch_2d + args.batch_3d)
        if args.batch_2d + args.batch_3d != lejepa.PAPER_BATCH:
            chosen.append(f"lambd={args.lambd:.3g} (the paper's balance at {args.batch_2d + args.batch_3d} samples per step)")
    args.warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    args.workers = (8 if cuda else 0) if args.workers is None else args.workers
    if args.stage == 1 and args.batch_3d:
        raise ValueError("--stage 1 is 2D only: --batch-3d must be 0")
    if args.zoom and args.zoom <= 1:
        raise ValueError(f"--zoom {args.zoom}: the largest rescaling factor must be > 1 (0: off)")
    if args.sigreg_per == "modality" and 1 in (args.batch_2d, args.batch_3d):
        raise ValueError(f"--sigreg-per modality: a modality with one sample per step (--batch-2d {args.batch_2d}, "
                         f"--batch-3d {args.batch_3d}) has no SIGReg of its own; use 0 or at least 2")
    if args.stage == 2 and not args.init:
        raise ValueError("--stage 2 starts from a stage-1 checkpoint: pass --init PATH")
    if args.paired_views and (not args.batch_3d or args.objective != "lejepa" or args.paired_views > args.n_local):
        raise ValueError(f"--paired-views {args.paired_views} replaces local views of CT samples: it needs 3D "
                         f"samples (--batch-3d > 0), --objective lejepa and at most --n-local {args.n_local}")
    if not cuda:
        where = "phantoms" if phantom else " ".join(args.data)
        return [f"CPU demo on {where}: " + ", ".join(chosen)] if chosen else []
    return [f"SIGReg weight {chosen[-1]}"] if chosen and chosen[-1].startswith("lambd=") else []


def lr_at(step: int, args) -> float:
    """Linear warmup then cosine decay to min_lr (paper 2.4: AdamW, cosine decay)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


class Net(nn.Module):
    """Backbone + head (projector for LeJEPA, linear layer for supervised) + online probe, one module for DDP.

    The online probe (as in the official LeJEPA example) is a layer-normed linear layer on the *detached* backbone
    embeddings, trained on the batch's labels by its own optimizer: it tells a run's health as it goes
    and never changes the encoder.
    """

    def __init__(self, backbone: SparseMedicalViT, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.probe = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, len(data.LABELS)))  # as the official example

    def forward(self, packed):
        """-> (backbone embeddings (V*N, dim), head outputs (V*N, K), probe logits (V*N, labels))."""
        return self.heads(self.backbone(packed))

    def heads(self, emb):
        return emb, self.head(emb), self.probe(emb.detach())


def build_net(args) -> Net:
    overrides = dict(attn=args.attn, drop_path=args.drop_path, input_stats=getattr(args, "input_stats", None))
    if args.depth:
        overrides["depth"] = args.depth
    backbone = SparseMedicalViT.from_preset(args.model, **overrides)
    backbone.grad_checkpointing = args.act_ckpt
    head = Projector(backbone.dim, args.proj_hidden, args.proj_out, args.proj_norm) if args.objective == "lejepa" else nn.Linear(backbone.dim, len(data.LABELS))
    return Net(backbone, head)


def masked_bce(logits, labels):
    """BCE over the known (non-NaN) labels, its mean taken over the known labels of the *global* batch.

    Under DDP each rank's share is scaled so that DDP's gradient average is the global mean's gradient:
    ranks with more unknown labels must not weigh more. No known label: 0, not NaN.
    """
    known = ~torch.isnan(labels)
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels.nan_to_num(), reduction="none")
    count, world = known.sum().float(), 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        dist.all_reduce(count)
    return torch.where(known, bce, 0.0).sum() * world / count.clamp(min=1)


def compute_loss(net, batch, objective: str, lambd: float, step: int, micro_batches: int = 1,
                 num_slices: int = 256, centroid: str = "global", sigreg_per: str = "batch"):
    """Loss of one (micro-)batch -> (loss to back-propagate, detached parts, what the step saw). Shared with bench.py.

    loss = the objective's loss + the online probe's BCE; the probe's input is detached, so its term
    trains the probe only. parts["loss"] is the objective's loss alone. Under DDP each rank's loss is
    scaled so that DDP's gradient average is the gradient of the global batch's loss: the same update
    on 1 GPU or N (tests/test_train.py checks both objectives).
    """
    emb, out, logits = net(batch.packed)  # (V * N, .): view v of sample n at row v * N + n
    v, n, g = batch.n_views, batch.n_samples, batch.n_global
    if objective == "supervised":
        loss = masked_bce(out, batch.labels)
        parts = {"bce": loss.detach()}  # averaged over ranks when logged: the global mean
    else:
        target = v if centroid == "all" else g  # paper 2.2: the centroid of the global views
        groups = dict(groups=batch.is_3d.long(), num_groups=2) if sigreg_per == "modality" else {}
        loss, parts = lejepa.lejepa_loss(out.view(v, n, -1), target, lambd=lambd, step=step,
                                         micro_batches=micro_batches, num_slices=num_slices, **groups)
    probe_labels = batch.labels.repeat(g, 1)  # the probe learns from the global views of each sample
    probe_loss = masked_bce(logits[:g * n], probe_labels)
    parts = {"loss": loss.detach(), **{k: p.detach() for k, p in parts.items()}, "probe_bce": probe_loss.detach()}
    seen = {"emb": emb.detach().view(v, n, -1)[:g].mean(0).float(),  # (N, dim) centroid of each sample's global views
            "proj": out.detach().view(v, n, -1)[:g].mean(0).float(),  # (N, K)
            "is_3d": batch.is_3d, "probe": logits.detach()[:g * n].float(), "labels": probe_labels}
    return loss + probe_loss, parts, seen


def param_groups(net: nn.Module, weight_decay: float):
    """Weight decay on matrices only: norms and biases are not decayed. The online probe has its own optimizer."""
    params = [*net.backbone.parameters(), *net.head.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def dataset_name(ds) -> str:
    """A cache by its folder, a phantom by its name."""
    return str(getattr(ds, "root", None) or ds.name)


def open_training_data(args):
    """(2D dataset or None, 3D dataset or None) from --data."""
    if args.data == ["phantom"]:
        ds2 = data.open_dataset("phantom2d", "train", n=args.n_2d, size=args.size_2d, seed=args.seed)
        ds3 = data.open_dataset("phantom3d", "train", n=args.n_3d, size=args.size_3d, seed=args.seed)
    else:
        found = {"2d": [], "3d": []}
        for spec in args.data:
            found[data.describe(spec)["modality"]].append(data.open_dataset(spec, "train"))
        if len(found["2d"]) > 1 or len(found["3d"]) > 1:
            raise ValueError(f"--data: give at most one 2D and one 3D cache, got {args.data}")
        ds2, ds3 = (found["2d"] or [None])[0], (found["3d"] or [None])[0]
    if args.batch_2d and ds2 is None:
        raise ValueError(f"--batch-2d {args.batch_2d} but no 2D dataset in --data {args.data}")
    if args.batch_3d and ds3 is None:
        raise ValueError(f"--batch-3d {args.batch_3d} but no 3D dataset in --data {args.data} (stage 1 needs none)")
    for ds, batch in ((ds2, args.batch_2d), (ds3, args.batch_3d)):
        if args.objective == "supervised" and batch and np.isnan(ds.labels).all():
            raise ValueError(f"--objective supervised: {dataset_name(ds)} has no known label at all")
    return (ds2 if args.batch_2d else None), (ds3 if args.batch_3d else None)


def save_checkpoint(path: str, net: Net, opts, step: int, args, bad_steps: int):
    """Everything needed to resume exactly; written to a temporary file, then renamed (atomic).
    opts: the encoder's optimizer and the online probe's."""
    ckpt = {
        "format": CKPT_FORMAT,
        "model_config": net.backbone.config,
        "model": net.backbone.state_dict(),
        "head": net.head.state_dict(),
        "optimizer": opts[0].state_dict(),
        "probe": net.probe.state_dict(),
        "probe_optimizer": opts[1].state_dict(),
        "step": step,  # the data stream and the LR schedule are functions of the step
        "bad_steps": bad_steps,
        "args": vars(args),
    }
    data.atomic_write(path, lambda f: torch.save(ckpt, f))


def find_resume(args) -> str | None:
    if args.resume in (None, "auto"):
        last = os.path.join(args.out, "last.pt")
        return last if args.resume == "auto" and os.path.exists(last) else None
    return args.resume


def check_same_model(path: str, ckpt: dict, net: Net):
    """A checkpoint of another model size is an error that names the file and what differs."""
    mine, theirs = net.backbone.config, ckpt["model_config"]
    shape_keys = ("dim", "depth", "heads", "mlp_ratio", "patch", "in_chans")
    if any(mine[k] != theirs.get(k) for k in shape_keys):
        diff = {k: (theirs.get(k), mine[k]) for k in shape_keys if mine[k] != theirs.get(k)}
        raise ValueError(f"{path}: checkpoint model differs from --model (checkpoint, this run): {diff}")


def load_init(net: Net, path: str):
    """Stage 2: backbone (and projector, if shapes agree) from a stage-1 checkpoint."""
    ckpt = load_checkpoint(path)
    check_same_model(path, ckpt, net)
    net.backbone.load_state_dict(ckpt["model"])
    head = ckpt.get("head", {})
    if all(k in head and head[k].shape == v.shape for k, v in net.head.state_dict().items()):
        net.head.load_state_dict(head)


def resume_from(path: str, net: Net, opts, device) -> tuple:
    """Weights and optimizer states from a checkpoint of this run -> (step, bad_steps) to continue at."""
    ckpt = load_checkpoint(path, map_location=device)
    check_same_model(path, ckpt, net)
    try:
        net.backbone.load_state_dict(ckpt["model"])
        net.head.load_state_dict(ckpt["head"])
        opts[0].load_state_dict(ckpt["optimizer"])
        if "probe" in ckpt:  # checkpoints older than the online probe start it afresh
            net.probe.load_state_dict(ckpt["probe"])
            opts[1].load_state_dict(ckpt["probe_optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot resume this run from it (another --objective or projector size?): "
                         f"{str(e).splitlines()[0]}") from e
    return ckpt["step"], ckpt["bad_steps"]


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


class Logger:
    """Rank 0 appends one JSON object per logged step to metrics.jsonl."""

    def __init__(self, out: str, rank: int, resume_step: int):
        self.path = os.path.join(out, "metrics.jsonl") if rank == 0 else None
        if self.path and os.path.exists(self.path):  # drop lines from after the checkpoint we resume from
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and _logged_step(ln) <= resume_step]
            data.atomic_write(self.path, lambda f: f.write("".join(keep).encode()))

    def log(self, record: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def setup_distributed():
    """Process group from torchrun's environment; a plain `python train.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local_rank) if cuda else None)
    return dist.get_rank(), dist.get_world_size(), local_rank


def resolve_inputs(args, cuda: bool, world: int, say) -> tuple:
    """Flags left unset, batch sizes against processes and --accum, --data, and SIGReg's weight at this batch
    (paper 2.2, 2.4) -> (2D dataset or None, 3D dataset or None)."""
    notes = resolve_defaults(args, cuda)
    for b, name in ((args.batch_2d, "--batch-2d"), (args.batch_3d, "--batch-3d")):
        if b % (world * args.accum):
            raise ValueError(f"{name} {b} must divide by processes x --accum = {world * args.accum}")
    ds2, ds3 = open_training_data(args)
    if args.standardize:  # the same samples every time: a resumed run rebuilds the same model
        args.input_stats = [data.intensity_stats(ds) if ds is not None else [0.0, 1.0] for ds in (ds2, ds3)]
        notes.append("inputs standardized per modality (mean, std): 2D {:.3f}, {:.3f}; 3D {:.3f}, {:.3f}".format(
            *args.input_stats[0], *args.input_stats[1]))
    for note in notes:
        say(note)
    for ds, batch, flag in ((ds2, args.batch_2d, "--batch-2d"), (ds3, args.batch_3d, "--batch-3d")):
        if ds is not None and len(ds) < batch:  # allowed (each step repeats samples, with other crops), but said
            say(f"warning: {dataset_name(ds)} has {len(ds)} training sample{'s' * (len(ds) != 1)}, fewer than the "
                f"{batch} per step of {flag}: every step repeats samples")
    n_step = args.batch_2d + args.batch_3d
    if args.objective == "lejepa" and lejepa.sigreg_weight(args.lambd, n_step) < lejepa.sigreg_weight(lejepa.PAPER_LAMBD, lejepa.PAPER_BATCH) / 2:
        say(f"warning: lambda {args.lambd:g} at {n_step} samples per step weighs SIGReg "
            f"{lejepa.sigreg_weight(args.lambd, n_step):.2g} against the prediction loss, the paper "
            f"{lejepa.sigreg_weight(lejepa.PAPER_LAMBD, lejepa.PAPER_BATCH):.2g}: expect collapse "
            f"(--lambd {lejepa.balanced_lambd(n_step):.3g} keeps the paper's balance)")
    return ds2, ds3


def build_or_resume(args, device, say) -> tuple:
    """The net and its two optimizers -> (net, (encoder optimizer, probe optimizer), step, bad_steps).

    paper 2.3: stages 1 and 3 start from scratch, stage 2 from a stage-1 checkpoint (--init);
    --resume continues a run where its checkpoint left it.
    """
    torch.manual_seed(args.seed)  # identical initialisation on every rank
    net = build_net(args)
    if args.stage == 2:
        load_init(net, args.init)
    net.to(device)
    # paper 2.4: AdamW, weight decay on matrices only
    opt = torch.optim.AdamW(param_groups(net, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    probe_opt = torch.optim.AdamW(net.probe.parameters(), lr=PROBE_LR, weight_decay=0.0)  # the official example's
    opts = (opt, probe_opt)
    step, bad_steps = 0, 0
    resume = find_resume(args)
    if resume:
        step, bad_steps = resume_from(resume, net, opts, device)
        say(f"resumed from {resume} at step {step}")
    elif args.resume == "auto":
        say(f"--resume auto: no checkpoint in {args.out} (no last.pt there), starting fresh at step 0")
    return net, opts, step, bad_steps


def open_out(args, rank: int, world: int, device, step: int) -> Logger:
    """--out (made only once the inputs are sound), every rank at the same step, config.json -> the metrics logger."""
    os.makedirs(args.out, exist_ok=True)
    if world > 1:  # every rank read its own --out: without a shared file system they could disagree
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0].item() != -steps[1].item():
            raise ValueError(f"ranks resume from different steps ({-steps[1].item()} to {steps[0].item()}): "
                             f"give every node the same {args.out} (a shared file system) or the same --resume file")
    if rank == 0:
        data.atomic_write(os.path.join(args.out, "config.json"), lambda f: f.write(json.dumps(vars(args), indent=2).encode()))
    return Logger(args.out, rank, step)


def open_batches(args, ds2, ds3, patch: int, step: int, rank: int, world: int, cuda: bool):
    """This rank's micro-batches from `step` on, --accum per step: the stage's 2D and 3D samples
    (paper 2.3, 2.4) as multi-crop views (2.4.1)."""
    return iter(make_loader(
        ds2, ds3, batch_2d=args.batch_2d // args.accum, batch_3d=args.batch_3d // args.accum,
        steps=args.steps * args.accum, start_step=step * args.accum,
        mode=args.objective, n_global=args.n_global, n_local=args.n_local, patch=patch,
        seed=args.seed, rank=rank, world=world, workers=args.workers, pin_memory=cuda, photometric=args.photometric,
        gamma=args.gamma, local_grid=args.local_grid, zoom=args.zoom, paired_views=args.paired_views, drr_size=args.size_2d or data.XRAY_SIZE))


@dataclass
class Tally:
    """What this rank saw since the last log; summed over ranks when logged, then started afresh."""
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # tokens, samples, skipped samples
    flops_per_token: list = field(default_factory=list)  # model FLOPs per token of each micro-batch
    probe_seen: list = field(default_factory=list)  # (probe scores, labels) of each micro-batch
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)


def train_step(model, net: Net, opts, batches, args, step: int, rank: int, world: int, device, tally: Tally,
               stop: StopSignals) -> tuple:
    """One optimizer step over --accum micro-batches -> (loss parts, gradient norm, what the last micro-batch
    saw, whether the step was taken: a non-finite gradient skips it). The caller says stop.reached(step + 1)."""
    opt, probe_opt = opts
    net.train()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)  # paper 2.4: linear warmup, then cosine decay
    torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # drop-path draws: a function of (seed, step, rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    parts_sum = {}
    for micro in range(args.accum):
        batch = next(batches).to(device, non_blocking=True)
        sync = micro == args.accum - 1 or world == 1
        with (nullcontext() if sync else model.no_sync()), autocast:  # paper 2.2: the LeJEPA loss (or the supervised BCE)
            loss, parts, seen = compute_loss(model, batch, args.objective, args.lambd, step, args.accum,
                                             args.slices, args.centroid, args.sigreg_per)
        (loss / args.accum).backward()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / args.accum
        tally.probe_seen.append((seen["probe"], seen["labels"]))  # scored before the probe learns from them
        tally.counts += torch.tensor([batch.packed.n_tokens, batch.n_samples, batch.n_skipped], dtype=torch.float64)
        tally.flops_per_token.append(model_flops_per_token(net.backbone.config, batch.packed.seqlens))
    encoder = [p for group in opt.param_groups for p in group["params"]]  # clipped; the online probe is not
    gnorm = torch.nn.utils.clip_grad_norm_(encoder, args.clip if args.clip > 0 else float("inf"))
    # one host sync per step: skip a non-finite step honestly (gradients are all-reduced, so every rank agrees)
    finite = torch.isfinite(gnorm).item()
    stop.updating()
    if finite:
        opt.step()
        probe_opt.step()
    opt.zero_grad(set_to_none=True)
    probe_opt.zero_grad(set_to_none=True)
    tally.steps += 1
    return parts_sum, gnorm, seen, finite


def collapse_warning(args, rank_proj: float, step: int) -> str:
    return (f"warning: the embedding is collapsing: effective rank of the projector output below "
            f"{COLLAPSE_RANK} for {COLLAPSE_LOGS} logged steps ({rank_proj:.2f} at step {step}); "
            f"SIGReg weighs {lejepa.sigreg_weight(args.lambd, args.batch_2d + args.batch_3d):.2g} against the prediction loss here, the paper "
            f"{lejepa.sigreg_weight(lejepa.PAPER_LAMBD, lejepa.PAPER_BATCH):.2g} (results/collapse.md)")


def train(args) -> dict:
    """Pretrain as paper 2.3-2.4 describe: AdamW steps on the mixed 2D/3D stream of one stage, logged and
    checkpointed as they go -> the last logged metrics record. Stopped by a signal (StopSignals): SystemExit
    with 128 + the signal once the checkpoint is written."""
    rank, world, local_rank = setup_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    say = tqdm.write if rank == 0 else (lambda *a, **k: None)  # tqdm.write: a line of its own, never glued to the bar
    try:  # the user's inputs (flags, --data, --init, --resume) first: a one-line error, and no --out made for nothing
        ds2, ds3 = resolve_inputs(args, cuda, world, say)
        net, opts, step, bad_steps = build_or_resume(args, device, say)  # paper 2.3: the stage's start
        check_step_memory(args, net, ds2, ds3, world, device)  # before the first step allocates it
    except (ValueError, FileNotFoundError) as e:
        rank_tag = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""  # under torchrun: which rank
        raise SystemExit(f"{rank_tag}train.py: error: {e}") from None
    logger = open_out(args, rank, world, device, step)

    model = DDP(net, device_ids=[local_rank] if cuda else None) if world > 1 else net
    if args.compile:
        net.backbone.compile(dynamic=True)
    say(model_line(args, net, world, device))
    batches = open_batches(args, ds2, ds3, net.backbone.patch, step, rank, world, cuda)
    end = min(args.steps, args.steps if args.stop_at is None else args.stop_at)
    ckpt_path = os.path.join(args.out, "last.pt")
    bar = _progress(step, args.steps, rank)
    stop = StopSignals(step, announcer(bar, rank))
    first, tally, skipped_total, low_rank_logs, last, interrupted = step + 1, Tally(), 0, 0, {}, False
    saved = None  # the step whose checkpoint was last written
    try:
        while step < end:  # paper 2.2: the loss; 2.4: AdamW, warmup then cosine decay
            parts_sum, gnorm, seen, finite = train_step(model, net, opts, batches, args, step, rank, world, device,
                                                        tally, stop)
            bad_steps = 0 if finite else bad_steps + 1
            step += 1
            stop.reached(step)  # a second signal during the update stops here, with the step whole
            if not finite:  # numbered like the metrics lines (the step count after it), so a resume rewinds it with them
                say(f"step {step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
                logger.log({"step": step, "skipped": "non-finite"})
            bar.update(1)
            done = step == end
            if step % args.log_every == 0 or done or step == first:  # the first: time per step and finish, early
                last = _log_metrics(logger, bar, step, end, parts_sum, gnorm, opts[0], tally, seen, device, world)
                skipped_total += last["skipped_samples"]
                low_rank_logs = low_rank_logs + 1 if last["rank_proj"] < COLLAPSE_RANK else 0
                if low_rank_logs == COLLAPSE_LOGS and args.objective == "lejepa":  # said once per run of low logs
                    say(collapse_warning(args, last["rank_proj"], step))
                tally = Tally()
            if _any_rank(stop.signal is not None, device, world) and not done:  # every step: act within one step
                interrupted = done = True
            if bad_steps >= args.max_bad_steps:
                if rank == 0:
                    save_checkpoint(ckpt_path, net, opts, step, args, bad_steps)
                raise RuntimeError(f"{bad_steps} non-finite steps in a row at step {step}: stopping "
                                   f"(lower --lr, set --clip, or check the data with `python data.py check`)")
            if rank == 0 and (step % args.ckpt_every == 0 or done):
                stop.updating()  # a second signal waits for the write: torch.save must not be cut off mid-file
                save_checkpoint(ckpt_path, net, opts, step, args, bad_steps)
                saved = step
                stop.reached(step)
            if done:
                break
    except StopNow as now:  # the second signal: the weights are those of now.step (bad_steps is that step's too)
        bar.close()
        if rank == 0 and saved != now.step:
            save_checkpoint(ckpt_path, net, opts, now.step, args, bad_steps)
        say(stopped_line(stop, now.step, args, ckpt_path, second=True))
        raise SystemExit(stop.exit_code) from None
    finally:  # the caller's handlers back: the checkpoint is written
        stop.restore()
    bar.close()
    if rank == 0 and step == 0:  # --steps 0: the initialisation itself, e.g. a random-init probe baseline
        save_checkpoint(ckpt_path, net, opts, step, args, bad_steps)
    if skipped_total:
        say(f"{skipped_total:.0f} unreadable samples were skipped, all ranks (see the warnings above)")
    if interrupted:  # not 0: `train.py ... && probe.py ...` must not go on with a half-trained model
        say(stopped_line(stop, step, args, ckpt_path))
        raise SystemExit(stop.exit_code)
    resume = " (--stop-at: continue with --resume auto)" if step < args.steps else ""
    say(f"done at step {step}{resume}: checkpoint {ckpt_path}")
    return last


def model_line(args, net: Net, world: int, device) -> str:
    """The run's first line after the defaults: the model's size (backbone and head apart), where, what."""
    def params(module):
        n = sum(p.numel() for p in module.parameters())
        return f"{n / 1e6:.1f}M" if n >= 50_000 else f"{n:,}"
    head = "projector" if args.objective == "lejepa" else "linear head"
    return (f"model {args.model}, depth {len(net.backbone.blocks)} (backbone {params(net.backbone)} + {head} "
            f"{params(net.head)} params), {world} process(es) on {device.type}, stage {args.stage}, {args.objective}, "
            f"{args.batch_2d} 2D + {args.batch_3d} 3D samples per step, data {args.data}")


def stopped_line(stop: StopSignals, step: int, args, ckpt_path: str, second: bool = False) -> str:
    """The last line of a run stopped by a signal: where it stopped, its exit status, how to go on."""
    name = signal.Signals(stop.signal).name if stop.signal else "another rank's signal"
    name = f"a second {name}" if second else name
    return (f"interrupted by {name} at step {step} of {args.steps}{', the last finished one' if second else ''} "
            f"(exit {stop.exit_code}): checkpoint {ckpt_path}; to continue, run the same command with --resume auto")


def _any_rank(flag: bool, device, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return t.item() > 0


def _gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's t (equal shapes: equal per-rank batches), concatenated in rank order."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def health(seen: dict, probe_seen: list, world: int) -> dict:
    """Embedding health at a logged step, over the global batch (all ranks).

    rank_* / std_*: effective rank and mean per-dimension spread of the step's (with --accum: its last
    micro-batch's) per-sample embeddings (centroids of the global views), backbone (emb) and head
    (proj, where the loss acts). A collapsed
    embedding has rank 1. The whole mixed batch counts the 2D/3D gap as one direction; rank_emb_2d /
    rank_emb_3d show the spread within each modality. probe_auroc: the online probe's macro AUROC on
    the global views since the last log, each scored before the probe learned from it.
    """
    emb, proj = _gather(seen["emb"], world), _gather(seen["proj"], world)
    is_3d = _gather(seen["is_3d"].float(), world).bool()
    out = {"rank_emb": lejepa.effective_rank(emb).item(), "rank_proj": lejepa.effective_rank(proj).item(),
           "std_emb": emb.std(0).mean().item(), "std_proj": proj.std(0).mean().item()}
    for name, mask in (("2d", ~is_3d), ("3d", is_3d)):
        if 2 <= mask.sum() < len(mask):  # a mixed batch: the spread within this modality
            out[f"rank_emb_{name}"] = lejepa.effective_rank(emb[mask]).item()
    scores = _gather(torch.cat([p for p, _ in probe_seen]), world).cpu().numpy()
    labels = _gather(torch.cat([y for _, y in probe_seen]), world).cpu().numpy()
    aurocs = []
    for j in range(labels.shape[1]):
        known = ~np.isnan(labels[:, j])
        if len(np.unique(labels[known, j])) == 2:
            aurocs.append(roc_auc_score(labels[known, j], scores[known, j]))
    if aurocs:  # none without labelled samples of both classes (e.g. unlabelled DICOM volumes)
        out["probe_auroc"] = float(np.mean(aurocs))
    return out


def _log_metrics(logger, bar, step, end, parts_sum, gnorm, opt, tally: Tally, seen: dict, device, world) -> dict:
    """All-reduce the step's loss parts (mean) and the tally since the last log (sum over ranks), print and
    append one JSONL record (every --log-every steps) with the embedding health."""
    elapsed = time.perf_counter() - tally.t0
    health_record = health(seen, tally.probe_seen, world)
    names = sorted(parts_sum)
    values = torch.stack([torch.as_tensor(parts_sum[k], dtype=torch.float32, device=device) for k in names])
    totals = tally.counts.to(device)
    if world > 1:
        dist.all_reduce(values)
        values /= world
        dist.all_reduce(totals)
    tokens, samples, skipped = totals.tolist()
    record = {"step": step, **dict(zip(names, values.tolist())), "lr": opt.param_groups[0]["lr"],
              "grad_norm": gnorm.item(), "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
              "step_time_s": elapsed / max(1, tally.steps), "skipped_samples": int(skipped),
              "tflops_per_s": tokens * sum(tally.flops_per_token) / max(1, len(tally.flops_per_token)) / elapsed / 1e12,
              **health_record}
    if device.type == "cuda":
        record["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    logger.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", rank=f"{record['rank_proj']:.2f}",
                    auroc=f"{record.get('probe_auroc', float('nan')):.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
    if bar.disable and logger.path:  # rank 0 without a bar (stderr is not a terminal: a log file): one plain line
        left = f", about {_duration(record['step_time_s'] * (end - step))} to step {end}" if step < end else ""
        print(f"step {step}/{bar.total}: loss {record['loss']:.4f}, projector rank {record['rank_proj']:.2f}, "
              f"probe AUROC {record.get('probe_auroc', float('nan')):.3f}, {record['tokens_per_s']:.0f} tokens/s, "
              f"{record['step_time_s']:.2f} s/step{left}", flush=True)
    return record


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days"


def _progress(start, total, rank):
    # total: --steps, not --stop-at (a run stopped at 6 of 300 is not done at "6/6")
    # disable=None: no bar when stderr is not a terminal, so a log file gets no line of carriage returns
    return tqdm(total=total, initial=start, disable=True if rank != 0 else None, dynamic_ncols=True, desc="train")


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except Exception as e:
        rank = os.environ.get("RANK")
        if rank is None:
            raise
        # under torchrun: say which rank failed and leave at once (no collective that could hang);
        # torchrun then stops the other ranks
        print(f"[rank {rank}] {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(1)
    if dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        if gloo:  # torch 2.13's gloo threads sometimes abort at interpreter teardown after a clean run:
            sys.stdout.flush()  # everything is written, so leave without the teardown
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped, checkpoint written: another Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # during the interpreter's teardown must neither kill
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the exit status nor print a traceback
        raise
