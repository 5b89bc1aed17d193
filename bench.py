"""Benchmarks: does sequence packing pay off, and how close does the GPU get to its peak?

    python bench.py                                  # CPU: tiny model, 6 2D + 2 3D samples (1/32 of the paper's)
    python bench.py --device cuda --model base --scale 1.0 --compile --json bench_h100.json
    python bench.py --smoke                          # seconds: what tests/test_bench.py runs
    python bench.py --device cuda --compile --profile trace.json   # + where the time goes (section 6)
    python bench.py --traffic H100                   # no GPU needed: what base's step asks of an H100 (section 7)
    python bench.py --gemm                           # one line: this machine's matmul GFLOP/s

Prints Markdown tables (device, torch version, date and settings first); --json writes the same rows.
1. One training step (forward + backward of train.compute_loss: LeJEPA, backbone + projector) on the
   paper's mixed batch (2.4: 192 2D + 64 3D samples x 2 global + 8 local native-resolution views) times
   --scale: packed (the project's path) vs padded (every view padded to the longest) vs per-modality
   padded (2D and 3D as two padded batches). Out of memory: all three again on half the batch.
2. Attention backends on the same packed batch: step time and agreement with sdpa.
3. Tokens and attention work of each scheme, counted from the view lengths: why the ratio is what it is.
4. The data pipeline (crops + collate + packing, views.make_loader, workers=0): samples/s per core.
5. CUDA only: MFU (model FLOPs/s over the dense bf16 peak), peak memory, largest batch for small and base.
6. --profile: one packed step under torch.profiler, its time by kind of operation (matmul, attention,
   RoPE, norms, casts, ...): GPU kernel time on CUDA (eager, and compiled with --compile), aten
   operator time on CPU. Where MFU falls short, this says which operations take the time.
7. --traffic [GPU]: counted, not timed, on any machine in seconds: the bytes and FLOPs of every operator
   of one eager bf16 step (fake tensors: shapes only), and the least time the named GPU needs for them.
8. Peers: the same views through the variable-resolution ViTs a user would pick instead (timm's
   NaFlexViT, vit-pytorch's NaViT variants; optional packages, skipped by name when absent), at equal
   width, depth, heads, MLP ratio and patch: forward + backward times, interleaved, and their ratio to ours.
9. --paired-views N: the packed step with N of each CT sample's local views replaced by crops of its DRR
   (train.py --paired-views, beyond the paper) against the same step without: tokens, time and their ratio.
--gemm: one line, this machine's matmul rate, to scale the README's times per step to your machine.

Padded batches are made from the packed one (pad_views) and run by the model's own modules: each view
is followed by a zero "padding view" of its modality up to the longest length L, so every row holds L
tokens that all go through every layer, and the sdpa row mask (each segment attends to itself) is the
key-padding mask of a plain ViT batch. Figures are printed, never asserted: machines are noisy.

Imports model, pack, data, views, train (its net and loss), opcount (sections 6 and 7: kinds of operation,
the operators counted) and peers (section 8); reproduce.py imports it for the GEMM rate.
"""
import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn as nn

import data
from model import PRESETS, available_backends, model_flops_per_token, resolve_backend
from opcount import GPUS, by_class, traffic_section
from pack import Packed, dense_layout, pack_rows
from peers import peer_section
from train import build_net, compute_loss
from train import get_args as train_args
from views import Batch, make_loader, make_views

PAPER_BATCH = (192, 64)  # paper 2.4: 2D and 3D samples of a mixed step
N_GLOBAL, N_LOCAL, LAMBD = 2, 8, 0.025  # paper 2.2, 2.4.1
CPU = dict(scale=1 / 32, model="tiny", warmup=1, repeats=3)  # 6 2D + 2 3D: about a minute on 2 quiet cores
CUDA = dict(scale=1.0, model="base", warmup=3, repeats=10)
SMOKE = dict(scale=0.01, model="tiny", depth=2, size_2d=56, size_3d=28, warmup=1, repeats=1, max_scale=0.01)
FLEX_EAGER_MAX_BYTES = 2 << 30  # eager flex_attention materializes the T x T scores of every head


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, help="fraction of the paper's 192 2D + 64 3D samples (default: 1 on CUDA, 1/32 on CPU)")
    p.add_argument("--model", choices=sorted(PRESETS), help="model size (default: base on CUDA, tiny on CPU)")
    p.add_argument("--depth", type=int, help="override the preset's depth")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to benchmark (default: %(default)s)")
    p.add_argument("--size-2d", type=int, default=data.XRAY_SIZE, help="2D long side (default: %(default)s, the paper's)")
    p.add_argument("--size-3d", type=int, default=data.CT_SIZE, help="3D long side (default: %(default)s, the paper's)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, help="timed steps, the median is reported (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--max-scale", type=float, default=4.0, help="CUDA: largest --scale tried in the largest-batch search (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="CUDA: also time the packed step under torch.compile (section 5)")
    p.add_argument("--json", help="write every table's rows to this JSON file")
    p.add_argument("--traffic", nargs="?", const="", metavar="GPU",
                   help="count instead of time (section 7 only, any machine, seconds): bytes and FLOPs of every "
                        "operator of one bf16 step and the least time GPU (default H100) needs for them")
    p.add_argument("--profile", nargs="?", const="", metavar="TRACE",
                   help="torch.profiler on one packed step: time by kind of operation (section 6); "
                        "TRACE: also write the Chrome trace (chrome://tracing, perfetto.dev) there")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms, crops and weights (default: %(default)s)")
    p.add_argument("--gemm", action="store_true", help="print this machine's matmul rate (one line, seconds) and stop: "
                   "the README's times per step scale with it")
    p.add_argument("--paired-views", type=int, default=0, metavar="N",
                   help="also section 9: the step with N DRR views per CT sample (train.py --paired-views) vs without")
    p.add_argument("--smoke", action="store_true", help="tiny model and images, 2 2D + 1 3D samples: seconds")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine")
    gpu_sized = args.device == "cuda" or args.traffic is not None  # --traffic counts for a GPU: base, paper batch
    for key, value in {**(CUDA if gpu_sized else CPU), **(SMOKE if args.smoke else {})}.items():
        if args.smoke or getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------- padded batches

@dataclasses.dataclass
class PaddedViews:
    """Stands in for Batch.packed: groups of views, each group padded to its longest view (pad_views)."""
    groups: list  # [(padded Packed, keep: ids of its real views in the batch, real: their positions in it)]
    n_views: int

    def to(self, device, non_blocking=False) -> "PaddedViews":
        return PaddedViews([(p.to(device, non_blocking), k.to(device), r.to(device)) for p, k, r in self.groups],
                           self.n_views)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p, _, _ in self.groups)


def pad_views(packed: Packed, keep: list[int]) -> tuple[Packed, torch.Tensor]:
    """Views `keep` of packed as a plain ViT batch: each padded with zero tokens to the longest of them.

    Row r holds view keep[r], then a "padding view" of L - n_r zero tokens of the same modality (none
    if n_r == L): len(keep) x L tokens, all through every layer. The padding is its own segment, so
    under the sdpa row mask real tokens never attend to it. Returns the padded Packed and the
    positions of the real views among its views.
    """
    lens = torch.tensor([packed.seqlens[i] for i in keep])
    rows, length = len(keep), int(lens.max())
    slot = torch.arange(length)
    is_real = (slot < lens[:, None]).flatten()  # (R*L,)
    has_pad = (lens < length).long()
    real_id = torch.arange(rows) + torch.cumsum(has_pad, 0) - has_pad  # view id of row r's real view
    token_view = (real_id[:, None] + (slot >= lens[:, None])).flatten()  # (R*L,): real view, then its padding view
    src = torch.where(is_real, (packed.cu_seqlens[keep].long()[:, None] + slot).flatten(), 0)  # source token
    slot_3d = torch.tensor([packed.is_3d[i] for i in keep]).repeat_interleave(length)
    row_of = torch.empty(packed.n_tokens, dtype=torch.long)  # token -> its row in patches_2d / patches_3d
    row_of[packed.index_2d] = torch.arange(len(packed.index_2d))
    row_of[packed.index_3d] = torch.arange(len(packed.index_3d))

    def patches(old: torch.Tensor, flag: bool):  # row len(old) of the extended array is the zero patch
        mine = slot_3d == flag
        rows_ = torch.where(is_real, row_of[src], len(old))[mine]
        return torch.cat([old, old.new_zeros(1, old.shape[1])])[rows_], mine.nonzero()[:, 0]

    (p2, i2), (p3, i3) = patches(packed.patches_2d, False), patches(packed.patches_3d, True)
    pad_index = torch.stack([torch.zeros_like(src), torch.zeros_like(src), (slot - lens[:, None]).flatten()], -1)
    patch_index = torch.where(is_real[:, None], packed.patch_index[src], pad_index)  # padding: a (1, 1, L - n) grid
    seqlens, is_3d, grids = [], [], []
    for i in keep:
        n, f = packed.seqlens[i], packed.is_3d[i]
        seqlens += [n] + [length - n] * (n < length)
        is_3d += [f] + [f] * (n < length)
        grids += [packed.view_grid[i].tolist()] + [[1, 1, length - n]] * (n < length)
    order, groups = dense_layout(seqlens)  # unused: PaddedNet runs rows, the padded ViT's key-padding mask
    padded = Packed(patches_2d=p2, patches_3d=p3, index_2d=i2, index_3d=i3, patch_index=patch_index,
                    view_grid=torch.tensor(grids), cu_seqlens=torch.tensor([0] + seqlens).cumsum(0).int(),
                    token_view=token_view, row_index=torch.arange(rows * length),
                    row_segment=token_view.int().view(rows, length), dense_order=order, dense_groups=groups,
                    max_seqlen=length, seqlens=seqlens, is_3d=is_3d)
    return padded, real_id


def padded_batch(batch: Batch, per_modality: bool) -> Batch:
    """The batch with all views padded to the longest one, or 2D and 3D views each to their own longest."""
    p = batch.packed
    groups = [[i for i, f in enumerate(p.is_3d) if f == flag] for flag in (False, True)] if per_modality \
        else [list(range(p.n_views))]
    padded = []
    for keep in filter(None, groups):
        views, real = pad_views(p, keep)
        padded.append((views, torch.tensor(keep), real))
    return dataclasses.replace(batch, packed=PaddedViews(padded, p.n_views))


class PaddedNet(nn.Module):
    """train.Net over PaddedViews: one backbone call per padded group, the real views' embeddings back
    in batch order, then the head. Run it with the sdpa backend: its rows (sdpa_rows) are the padded
    batch and their mask is the key-padding mask."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, padded: PaddedViews) -> torch.Tensor:
        emb, backbone = None, self.net.backbone
        saved, backbone.sdpa_rows = backbone.sdpa_rows, True
        try:
            for packed, keep, real in padded.groups:
                e = backbone(packed)[real]  # (len(keep), dim)
                emb = e.new_zeros(padded.n_views, e.shape[1]) if emb is None else emb
                emb = emb.index_copy(0, keep, e)
        finally:
            backbone.sdpa_rows = saved
        return self.net.heads(emb)


def scheme_work(seqlens: list[int], is_3d: list[bool]) -> list[dict]:
    """Tokens through the linear layers and query-key pairs through attention, for each scheme."""
    real, longest, useful = sum(seqlens), max(seqlens), sum(n * n for n in seqlens)
    rows = pack_rows(seqlens)[2]
    mods = [g for g in ([n for n, f in zip(seqlens, is_3d) if f == flag] for flag in (False, True)) if g]
    schemes = [("packed (varlen, flash, sdpa)", real, useful), ("packed (compiled sdpa rows)", real, rows * longest**2),
               ("padded", len(seqlens) * longest, len(seqlens) * longest**2),
               ("per-modality padded", sum(len(g) * max(g) for g in mods), sum(len(g) * max(g) ** 2 for g in mods))]
    return [{"scheme": name, "views": len(seqlens), "real tokens": real, "tokens computed": tokens,
             "padding %": 100 * (1 - real / tokens), "attention pairs (M)": pairs / 1e6,
             "useful attention %": 100 * useful / pairs} for name, tokens, pairs in schemes]


# ---------------------------------------------------------------- timing

def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@contextmanager
def threads(n: int):
    """Run with n intra-op threads for the duration."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def attention(net, backend: str, rows: bool = False):
    """Run net's backbone with another attention backend (sdpa: rows = the masked-rows layout) for the duration."""
    backbone = net.backbone
    saved = backbone.attn, backbone.sdpa_rows
    backbone.attn, backbone.sdpa_rows = backend, rows
    try:
        yield
    finally:
        backbone.attn, backbone.sdpa_rows = saved


def train_step(net, batch, device) -> torch.Tensor:
    """Forward + backward of the training loss (no optimizer step); returns the loss."""
    net.zero_grad(set_to_none=True)
    with autocast(device):
        loss, *_ = compute_loss(net, batch, "lejepa", LAMBD, batch.step)
    loss.backward()
    return loss.detach()


def measure(net, batch, device, warmup: int, repeats: int) -> dict | None:
    """Median seconds of train_step after warm-up, the loss and (CUDA) peak memory; None if out of memory."""
    cuda = device.type == "cuda"
    times = []
    try:
        for i in range(warmup + max(1, repeats)):
            if i == warmup and cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            loss = train_step(net, batch, device)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        times = None
    if times is None:  # outside the except block, so the failed step's tensors are released
        net.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return None
    return {"seconds": statistics.median(times[warmup:]), "loss": float(loss),
            "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


# ---------------------------------------------------------------- the sections

class Workload:
    """Phantom datasets (rendered once, kept in memory) and mixed batches of the paper's composition."""

    def __init__(self, args, patch: int):
        self.args, self.patch = args, patch
        self.n_2d, self.n_3d = self.samples(args.scale)
        self.ds_2d = data.open_dataset("phantom2d", "train", n=self.n_2d, size=args.size_2d, seed=args.seed)
        self.ds_3d = data.open_dataset("phantom3d", "train", n=self.n_3d, size=args.size_3d, seed=args.seed)
        for ds in (self.ds_2d, self.ds_3d):  # render now: the timings read records as from a cache
            for i in range(len(ds)):
                ds[i]

    @staticmethod
    def samples(scale: float) -> tuple[int, int]:
        return tuple(max(1, round(b * scale)) for b in PAPER_BATCH)

    def loader(self, n_2d: int, n_3d: int, steps: int = 1, paired_views: int = 0):
        return make_loader(self.ds_2d if n_2d else None, self.ds_3d if n_3d else None, batch_2d=n_2d,
                           batch_3d=n_3d, steps=steps, n_global=N_GLOBAL, n_local=N_LOCAL, patch=self.patch,
                           seed=self.args.seed, workers=0, paired_views=paired_views, drr_size=self.args.size_2d)

    def views(self, scale: float) -> list[torch.Tensor]:
        """A step's samples at this scale as separate views (1, Z, H, W), for models that take a list."""
        rng = np.random.default_rng(self.args.seed)
        return [v for ds, n in zip((self.ds_2d, self.ds_3d), self.samples(scale)) for i in range(n)
                for v in make_views(ds[i % len(ds)].image, rng, self.patch, N_GLOBAL, N_LOCAL)]

    def batch(self, scale: float, paired_views: int = 0) -> Batch:
        """Step 0 at this scale (a dataset smaller than the batch is cycled, with new crops)."""
        return next(iter(self.loader(*self.samples(scale), paired_views=paired_views)))


def make_net(args, model: str, device):
    torch.manual_seed(args.seed)
    depth = ["--depth", str(args.depth)] if args.depth else []
    opts = train_args(["--model", model, "--attn", "auto", "--drop-path", "0", "--objective", "lejepa", *depth])
    return build_net(opts).to(device).train()  # train.py's defaults (projector size, ...)


def step_section(args, net, work: Workload, device) -> tuple[list[dict], list[dict]]:
    """Section 1 (and the counts of section 3 for every batch timed): packed vs padded vs per-modality padded."""
    default = resolve_backend("auto", device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows, work_rows, scale = [], [], args.scale
    while True:
        batch = work.batch(scale)
        schemes = [("packed", net, batch, default), ("padded", PaddedNet(net), padded_batch(batch, False), "sdpa"),
                   ("per-modality padded", PaddedNet(net), padded_batch(batch, True), "sdpa")]
        found = []
        for name, model, b, backend in schemes:
            with attention(net, backend):
                r = measure(model, b.to(device), device, args.warmup, args.repeats)
            found.append(r)
            rows.append({"scale": scale, "samples": f"{b.n_samples - int(b.is_3d.sum())} + {int(b.is_3d.sum())}",
                         "scheme": name, "attention": backend, "tokens computed": b.packed.n_tokens,
                         "step (s)": r and r["seconds"], "real tokens/s": r and batch.packed.n_tokens / r["seconds"],
                         "time vs packed": r and found[0] and r["seconds"] / found[0]["seconds"],
                         "loss": r and r["loss"], **({"peak GB": r and r["peak_gb"]} if device.type == "cuda" else {})})
        work_rows += [{"scale": scale, **w} for w in scheme_work(batch.packed.seqlens, batch.packed.is_3d)]
        if all(found) or scale < 1e-3:
            return rows, work_rows
        scale /= 2  # a scheme ran out of memory: compare the three again on half the batch


def paired_section(args, net, work: Workload, device, scale: float) -> list[dict]:
    """Section 9: the same step 0 with and without --paired-views (the CT samples' own crops are the same)."""
    rows, base = [], None
    for n in (0, args.paired_views):
        b = work.batch(scale, paired_views=n)
        r = measure(net, b.to(device), device, args.warmup, args.repeats)
        base = base or (r and r["seconds"])
        rows.append({"paired views per CT sample": n, "views 2D + 3D": f"{b.packed.is_3d.count(False)} + "
                     f"{b.packed.is_3d.count(True)}", "tokens": b.packed.n_tokens, "step (s)": r and r["seconds"],
                     "time vs default": r and base and r["seconds"] / base})
    return rows


def backend_section(args, net, batch, device, known: dict) -> list[dict]:
    """Section 2: every attention backend available here on the same packed batch (known: {backend: seconds})."""
    rows, ref, b = [], None, batch.to(device)
    heads, n = net.backbone.config["heads"], b.packed.n_tokens
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        names = available_backends(device)
        for name, as_rows in [(names[0], False), (names[0], True), *((other, False) for other in names[1:])]:
            label = f"{name} (rows, the compiled layout)" if as_rows else name
            row = {"backend": label, "step (s)": None if as_rows else known.get(name), "time vs sdpa": None,
                   "max abs Δ embedding vs sdpa": None, "note": ""}
            rows.append(row)
            if name == "flex" and n * n * heads * 4 > FLEX_EAGER_MAX_BYTES:
                row["note"] = f"skipped: eager flex_attention would hold {n * n * heads * 4 / 2**30:.0f} GB of scores"
                continue
            try:
                with attention(net, name, as_rows):
                    with torch.no_grad(), autocast(device):
                        emb = net.backbone(b.packed).float()
                    ref = emb if ref is None else ref
                    row["max abs Δ embedding vs sdpa"] = (emb - ref).abs().max().item()
                    if row["step (s)"] is None:
                        r = measure(net, b, device, args.warmup, args.repeats)
                        row["step (s)"], row["note"] = (r["seconds"], "") if r else (None, "out of memory")
            except (NotImplementedError, RuntimeError) as e:
                row["note"] = f"{type(e).__name__}: {str(e).split('. ')[0][:100]}"
            if row["step (s)"] and rows[0]["step (s)"]:
                row["time vs sdpa"] = row["step (s)"] / rows[0]["step (s)"]
    return rows


def data_section(work: Workload, min_seconds: float) -> list[dict]:
    """Section 4: crops + collate + packing per modality, in this process (workers=0), on one thread."""
    rows = []
    for name, n_2d, n_3d in (("2D", work.n_2d, 0), ("3D", 0, work.n_3d)):
        samples = views = tokens = 0
        t0 = time.perf_counter()
        with threads(1):
            for step, b in enumerate(work.loader(n_2d, n_3d, steps=10_000)):
                samples, views, tokens = samples + b.n_samples, views + b.packed.n_views, tokens + b.packed.n_tokens
                if step >= 1 and time.perf_counter() - t0 > min_seconds:
                    break
        sec = time.perf_counter() - t0
        rows.append({"modality": name, "samples": samples, "samples/s per core": samples / sec,
                     "views/s per core": views / sec, "tokens/s per core": tokens / sec})
    return rows


def gpu_peak(device) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of this GPU and its label (None and the device name if unknown)."""
    name = torch.cuda.get_device_name(device)
    return next(((tflops * 1e12, label) for fragment, tflops, _, label in GPUS if fragment in name), (None, name))


def mfu_row(config, batch, r, peak) -> dict:
    flops = model_flops_per_token(config, batch.packed.seqlens) * batch.packed.n_tokens  # fwd + bwd matmuls
    sec = r and r["seconds"]
    return {"tokens": batch.packed.n_tokens, "step (s)": sec, "TFLOP/s": sec and flops / sec / 1e12,
            "MFU %": sec and peak and 100 * flops / sec / peak, "peak GB": r and r["peak_gb"]}


def gpu_section(args, net, work: Workload, device, packed: dict | None) -> tuple[list[dict], list[dict]]:
    """Section 5: MFU of the packed step (eager, and compiled with --compile); largest batch for small and base."""
    peak, _ = gpu_peak(device)
    batch = work.batch(args.scale)
    label = f"{args.model}, scale {args.scale:g}, {resolve_backend('auto', device, torch.bfloat16)}"
    rows = [{"run": f"{label}, eager", **mfu_row(net.backbone.config, batch, packed, peak)}]
    if args.compile:
        net.backbone.compile(dynamic=True)
        r = measure(net, batch.to(device), device, args.warmup + 2, args.repeats)
        rows.append({"run": f"{label}, torch.compile", **mfu_row(net.backbone.config, batch, r, peak)})
    largest = []
    for model in ("small", "base"):
        net = make_net(args, model, device)
        best, scale = {"model": model, "scale": f"< {args.scale:g}"}, args.scale
        while scale <= args.max_scale:
            b = work.batch(scale)
            r = measure(net, b.to(device), device, 1, 1)
            if r is None:
                break
            best = {"model": model, "scale": scale, "samples": b.n_samples, **mfu_row(net.backbone.config, b, r, peak)}
            scale *= 2
        largest.append(best)
        del net
        gc.collect()
        torch.cuda.empty_cache()
    return rows, largest


def profile_section(args, net, batch, device, label: str, trace: str = "") -> list[dict]:
    """Section 6: one packed step under torch.profiler, its time split by kind of operation.

    CUDA: the duration of every GPU kernel, so the GPU's idle time (launches, host syncs) is what is
    left of the wall time. CPU: the self time of every aten operator (Python and autograd overhead
    are left over).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda, b = device.type == "cuda", batch.to(device)
    measure(net, b, device, warmup=max(1, args.warmup) - 1, repeats=1)  # warm (and compiled) before profiling
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t0 = time.perf_counter()
        train_step(net, b, device)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    if trace:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json"), "rb") as f:
                data.atomic_write(trace, lambda out: shutil.copyfileobj(f, out))
    if cuda:
        timed = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]
    classes = by_class((name, {"s": us / 1e6}) for name, us in timed)
    rows = [{"step": label, "operations": k, "ms": 1e3 * c["s"], "% of step": 100 * c["s"] / wall,
             "calls": c["calls"], "largest": c["largest"][:60]} for k, c in classes.items()]
    rest = wall - sum(c["s"] for c in classes.values())
    rows.append({"step": label, "operations": "GPU idle (launches, syncs)" if cuda else "outside aten operators",
                 "ms": 1e3 * rest, "% of step": 100 * rest / wall, "calls": None, "largest": None})
    return rows


# ---------------------------------------------------------------- output

def fmt(key: str, v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if key == "loss":
            return f"{v:.6f}"
        if key.startswith("time vs"):
            return f"{v:.2f}x"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def table(title: str, rows: list[dict], note: str = "") -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"\n### {title}\n", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines + ([f"\n{note}"] if note else []))


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"


def gemm_rate(device, n: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n matmul in the dtype training runs in here (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: thread pool, kernels
    count, t0 = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> dict:
    args = get_args(argv)
    if args.gemm:
        device = torch.device(args.device)
        rate = gemm_rate(device)
        print(f"{machine(device)}: {rate:,.0f} GFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'} 2048x2048 matmul)")
        return {"meta": {"device": machine(device), "GEMM GFLOP/s": rate}}
    # a smoke run checks that every section runs: one thread never stalls on thread barriers on a busy machine
    with threads(1) if args.smoke else nullcontext():
        return run(args)


def run(args) -> dict:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    net = make_net(args, args.model, device)
    work = Workload(args, net.backbone.patch)
    meta = {"device": machine(device), "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "model": args.model,
            "depth": net.backbone.config["depth"],
            "params (M)": round(sum(p.numel() for p in net.backbone.parameters()) / 1e6, 2), "scale": args.scale,
            "samples": f"{work.n_2d} 2D + {work.n_3d} 3D", "views per sample": f"{N_GLOBAL} global + {N_LOCAL} local",
            "long side": f"2D {args.size_2d}, 3D {args.size_3d}",
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            **({"precision": "bf16 autocast, counted on fake tensors"} if args.traffic is not None else {}),
            **({} if args.traffic is not None else {"timing": f"median of {args.repeats} after {args.warmup} warm-up"}),
            "smoke": args.smoke,
            "GEMM GFLOP/s": round(gemm_rate(device, seconds=0.1 if args.smoke else 1.0))}
    print(f"## MultiMedVision bench: {meta['device']}, torch {meta['torch']}, {meta['date']}\n")
    print("\n".join(f"- {k}: {v}" for k, v in meta.items()), flush=True)
    report = {"meta": meta}

    def show(title: str, rows: list[dict], note: str = ""):
        print(table(title, rows, note), f"({time.perf_counter() - t_start:.0f} s)", sep="\n\n", flush=True)

    if args.traffic is not None:
        report["traffic"], note = traffic_section(args, net, work.batch(args.scale))
        show(f"7. Bytes and FLOPs of one eager step, counted (scale {args.scale:g}, "
             f"{work.n_2d} 2D + {work.n_3d} 3D samples)", report["traffic"], note)
    else:
        timed_sections(args, net, work, device, report, show)
    report["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"total {report['meta']['seconds']} s")
    if args.json:
        data.atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
        print(f"wrote {args.json}")
    return report


def timed_sections(args, net, work: Workload, device, report: dict, show):
    """Sections 1-6 into report, each printed as it is done."""
    report["step"], report["work"] = step_section(args, net, work, device)
    last = [r for r in report["step"] if r["scale"] == report["step"][-1]["scale"]]  # where all three fit
    headline = "Out of memory at every scale tried: no comparison."
    if all(r["step (s)"] for r in last):
        spread = max(abs(r["loss"] - last[0]["loss"]) for r in last) / abs(last[0]["loss"])
        headline = (f"**Packing speed-up: {last[1]['time vs packed']:.2f}x over padded, "
                    f"{last[2]['time vs packed']:.2f}x over per-modality padded** (scale {last[0]['scale']:g}). "
                    f"The losses agree to {spread:.1e} (relative): the three schemes compute the same thing.")
    show("1. Training step: packed vs padded (forward + backward, LeJEPA loss, backbone + projector)",
         report["step"], headline)
    batch = work.batch(last[0]["scale"])  # sdpa rows fit where the padded schemes did
    report["backends"] = backend_section(args, net, batch, device, {last[0]["attention"]: last[0]["step (s)"]})
    show(f"2. Attention backends (same packed batch, scale {last[0]['scale']:g}, {batch.packed.n_tokens:,} tokens)",
         report["backends"])
    show("3. Work per scheme (counted from the view lengths)", report["work"],
         "Tokens computed go through every linear layer; attention pairs are query-key products per head "
         "and layer. Eager sdpa runs each set of equal-length views as one dense batch (pack.dense_layout, "
         f"{len(batch.packed.dense_groups)} calls per layer here), so it computes only the useful pairs; under "
         "torch.compile it runs masked rows (rows x L², masked pairs are computed too) to keep one graph.")
    report["data"] = data_section(work, min_seconds=0.0 if args.smoke else 3.0)
    packed = report["step"][0]  # at --scale
    per_step = work.n_2d / report["data"][0]["samples/s per core"] + work.n_3d / report["data"][1]["samples/s per core"]
    feed = f"One {work.n_2d} + {work.n_3d} step takes {per_step:.3g} core-seconds to prepare"
    feed += f": {per_step / packed['step (s)']:.3g} cores keep the packed step fed." if packed["step (s)"] else "."
    show("4. Data pipeline (make_views + pack via views.make_loader, workers=0, one thread; phantom records "
         "rendered beforehand, as read from a cache)", report["data"], feed)
    report["peers"] = peer_section(args, net, work.views(last[0]["scale"]), device)
    show(f"8. Peers: the backbone alone, forward + backward, on the same views (scale {last[0]['scale']:g})",
         report["peers"], "Ours includes packing the views; each peer gets them as its API takes them. Equal "
         "width, depth, heads, MLP ratio and patch; the rest is each peer's default (ours: a P^3 patch embedding "
         "shared with 3D, hence more parameters). Optional packages: pip install timm vit-pytorch.")
    if args.paired_views:
        report["paired"] = paired_section(args, net, work, device, last[0]["scale"])
        show(f"9. --paired-views {args.paired_views}: the step with DRR crops in the CT samples' last local "
             f"slots (scale {last[0]['scale']:g})", report["paired"])
    traces = []

    def profile(label: str):  # section 6, eager here and compiled after section 5
        trace = args.profile and (args.profile if label == "eager" else f"{args.profile}.{label}.json")
        report.setdefault("profile", []).extend(profile_section(args, net, batch, device, label, trace))
        traces.extend([trace] if trace else [])

    if args.profile is not None:
        profile("eager")
    if device.type == "cuda":
        peak, label = gpu_peak(device)
        packed_run = packed["step (s)"] and {"seconds": packed["step (s)"], "peak_gb": packed["peak GB"]}
        report["mfu"], report["largest batch"] = gpu_section(args, net, work, device, packed_run)
        show("5. GPU: model FLOPs utilization of the packed step", report["mfu"],
             f"Peak: {label}, {peak / 1e12:.0f} TFLOP/s dense bf16." if peak else f"{label}: peak unknown, no MFU.")
        show(f"5b. Largest batch that fits (--scale doubled up to {args.max_scale:g})", report["largest batch"])
        if args.profile is not None and args.compile:
            profile("compiled")  # section 5 compiled the backbone in place
    if args.profile is not None and "profile" in report:
        show(f"6. Profile of one packed step (torch.profiler, scale {last[0]['scale']:g}, "
             f"{'GPU kernel time' if device.type == 'cuda' else 'CPU operator self time'})", report["profile"],
             f"Chrome trace: {', '.join(traces)}" if traces else "")


if __name__ == "__main__":
    main()
