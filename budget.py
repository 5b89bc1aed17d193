"""What a training step costs before it runs: its tokens and peak memory, estimated from the batch, the views
and the model (paper 2.4's batch: 192 2D + 64 3D samples x 2 global + 8 local views, 2.4.1).

- Tokens: tokens_per_sample draws a sample's views with views.make_views on a dataset's image shapes (a cache's
  index has them; a phantom is rendered once) and counts their patches (view_tokens).
- Memory: step_memory is a fit, measured on a CPU (the constants below, with their measurements), of one
  process's peak: activations per token, layer and unit of width (fewer with --act-ckpt), the packed patches,
  and parameters with their gradients and AdamW moments; available_memory is what this machine has.
- check_step_memory refuses, before the first step allocates it, a step that does not fit: one line with both
  figures and the flags that lower it (--batch-2d/--batch-3d, --accum, --act-ckpt).

Imports views (make_views), numpy and torch; `net` is train.py's Net (a backbone and a head). train.py imports
this module; nothing here imports train.py.
"""
import math
import os

import numpy as np
import torch

from views import make_views

# A step's peak memory (step_memory): a least-squares fit to the peak resident memory (VmHWM) of
# `train.py --steps 2` on caches of the NIH and DICOM samples (224 x 224 radiographs, an 81 x 112 x 112 CT), 2-core
# AMD EPYC, torch 2.13.0+cpu, fp32, 2026-12-02; within 6% (120 MB) of every run. Tokens per step (2D + 3D), layers x
# width: peak MB
#   5,862 + 0, 6 x 192: 1,088     16,459 + 0, 6 x 192: 2,235     32,855 + 0, 6 x 192: 3,907     16,459 + 0, 2 x 192: 1,183
#   0 + 2,080, 6 x 192:   769      0 + 7,817, 6 x 192: 1,379     16,459 + 7,817, 6 x 192: 2,995 (3,240 after 6 steps)
#   5,862 + 0, 12 x 384: 2,907    16,459 + 0, 12 x 192: 3,702
# --act-ckpt: 32,855 + 0, 2 x 192: 1,715; 6 x 192: 2,066; 12 x 192: 4,315; 16,459 + 0, 12 x 192: 2,657.
# Over a run the peak grows further, to a plateau after about 10 steps (the allocator's caching, the largest crops
# drawn): 8 + 2 samples, 6 x 192: 1,333 MB after 2 steps, 1,523 MB from step 10 to 16, hence STEADY_FACTOR.
# Not measured on a GPU: there activations are taken as bf16 (autocast), and the process's own memory is not counted.
BASE_BYTES = 376 * 2**20  # the process before its first step: Python, torch, the data's index
ACT_FLOATS = 18.8  # activations kept for backward, in floats per token, per layer and per unit of width
ACT_CKPT_FLOATS = 9.0  # the same with --act-ckpt (a block keeps its input; one recomputes at a time): 3.2 per
#                        layer at 2 and 6 layers, 9-11 at 12 (the presets' depth), where the allocator keeps more
TOKEN_FLOATS = 26.6  # outside the layers (embedding, RoPE tables, final norm, index tensors), per token and unit of width
PATCH_FLOATS = 0.65  # the step's packed patches, per input value of a token (2D: P^2 values, 3D: P^3)
STATE_FLOATS = 4  # per parameter: weight, gradient, AdamW's two moments
STEADY_FACTOR = 1.2  # a run's plateau over its first 2 steps, for what a step allocates (activations, patches)


def view_tokens(view: torch.Tensor, patch: int) -> int:
    """Tokens of a view (1, z, h, w): patches along every axis longer than one (z == 1: a 2D image)."""
    return math.prod(n // patch for n in view.shape[1:] if n > 1)


def tokens_per_sample(ds, args, patch: int, draws: int = 16) -> float:
    """Mean tokens of one sample's views (paper 2.4.1), drawn by views.make_views, with the loader's crop
    scales, on the dataset's image shapes (a cache's index has them; a phantom is rendered once)."""
    records = getattr(ds, "records", None)
    if records:
        shapes = [tuple(records[i]["shape"]) for i in np.linspace(0, len(records) - 1, draws).astype(int)]
    else:
        shapes = [ds[0].image.shape] * draws
    n_global, n_local = (1, 0) if args.objective == "supervised" else (args.n_global, args.n_local)
    rng, counts = np.random.default_rng(args.seed), []
    for shape in shapes:
        try:
            views = make_views(np.zeros(shape, np.float32), rng, patch, n_global, n_local,
                               local_grid=getattr(args, "local_grid", 0), zoom=getattr(args, "zoom", 0.0))
        except ValueError:  # smaller than a patch: the loader skips such a record
            continue
        counts.append(sum(view_tokens(v, patch) for v in views))
    return float(np.mean(counts)) if counts else 0.0


def step_memory(net: torch.nn.Module, tokens_2d: float, tokens_3d: float, cuda: bool, act_ckpt: bool) -> float:
    """Peak bytes of one process's (micro-)steps of these tokens, once a run has settled: activations of every
    layer and outside them, the patches, and parameters with their gradients and AdamW moments (the constants
    above; the projector's activations, a few MB, are in the fit). On CUDA, activations in bf16 (autocast) and no
    process overhead (the free memory excludes it)."""
    dim, depth, patch = net.backbone.dim, len(net.backbone.blocks), net.backbone.patch
    floats_per_dim = TOKEN_FLOATS + (depth * ACT_CKPT_FLOATS + ACT_FLOATS if act_ckpt else depth * ACT_FLOATS)
    act_bytes = 2 if cuda else 4
    activations = (tokens_2d + tokens_3d) * dim * floats_per_dim * act_bytes
    patches = (tokens_2d * patch**2 + tokens_3d * patch**3) * PATCH_FLOATS * 4
    state = sum(p.numel() for p in net.parameters()) * STATE_FLOATS * 4
    return (0 if cuda else BASE_BYTES) + state + STEADY_FACTOR * (activations + patches)


def available_memory(device) -> tuple:
    """(bytes one process may use, where the figure comes from), None where unknown (not Linux).
    CUDA: the device's free memory and what this process holds; CPU: MemAvailable and this process's resident
    memory, shared by the processes of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device), f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        with open("/proc/self/status") as f:
            resident = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return (available + resident) / local, "MemAvailable in /proc/meminfo" + (f" / {local} processes" if local > 1 else "")


def check_step_memory(args, net: torch.nn.Module, ds2, ds3, world: int, device):
    """Refuse, before the first step allocates it, a step whose estimated peak memory exceeds what this
    machine has: one line with both figures, the flags that lower it and, where one does, the --accum that fits."""
    found = available_memory(device)
    if found is None:
        return
    available, where = found
    patch, views = net.backbone.patch, 1 if args.objective == "supervised" else args.n_global + args.n_local
    per_sample = [0.0 if ds is None else tokens_per_sample(ds, args, patch) for ds in (ds2, ds3)]

    def need(accum: int, act_ckpt: bool) -> float:
        b2, b3 = args.batch_2d / (world * accum), args.batch_3d / (world * accum)
        return step_memory(net, b2 * per_sample[0], b3 * per_sample[1], device.type == "cuda", act_ckpt)

    needed = need(args.accum, args.act_ckpt)
    if needed <= available:
        return
    gb = lambda n: f"{n / 2**30:.1f} GB"  # noqa: E731
    fits = [k for k in range(args.accum + 1, 1 + max(args.batch_2d, args.batch_3d) // world)
            if not (args.batch_2d % (world * k) or args.batch_3d % (world * k)) and need(k, args.act_ckpt) <= available]
    tokens = (args.batch_2d * per_sample[0] + args.batch_3d * per_sample[1]) / (world * args.accum)
    raise ValueError(f"a step needs about {gb(needed)} per process (estimated: {tokens:,.0f} tokens of "
                     f"{args.batch_2d} 2D + {args.batch_3d} 3D samples x {views} views through "
                     f"{len(net.backbone.blocks)} layers of width {net.backbone.dim}), but {gb(available)} "
                     f"are available ({where}): lower --batch-2d/--batch-3d, split the step with --accum"
                     + (f" (--accum {fits[0]}: about {gb(need(fits[0], args.act_ckpt))})" if fits else "")
                     + ("" if args.act_ckpt else f", or add --act-ckpt (about {gb(need(args.accum, True))})"))
