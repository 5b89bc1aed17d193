"""The same views through other open implementations (bench.py section 8): the variable-resolution ViTs a user
would pick instead of ours (paper 2.1.2: packing against padding), at our width, depth, heads, MLP ratio and
patch, each fed the views as its API takes them, forward + backward timed against ours, interleaved.

- timm's NaFlexViT: patches padded to the longest view with a key mask, as its NaFlex collator hands them;
- vit-pytorch's NaViT: rows packed with block masks, or nested tensors; its 3D NaViT for the volumes.
Optional imports: a peer whose package is absent (or broken) gets a row saying so and is skipped, never the
end of the bench.

Imports model (ours, its attention backends), pack, torch; timm and vit_pytorch lazily, optional.
bench.py imports this module.
"""
import functools
import statistics
import time
import warnings
from contextlib import nullcontext

import torch

import model as model_lib
from model import resolve_backend
from pack import pack


def _timm_naflex(cfg, views):
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
    p = cfg["patch"]
    net = NaFlexVit(NaFlexVitCfg(patch_size=p, embed_dim=cfg["dim"], depth=cfg["depth"], num_heads=cfg["heads"],
                                 mlp_ratio=cfg["mlp_ratio"], global_pool="avg"), in_chans=1, num_classes=0)

    def run(views):  # what timm's NaFlex collator hands the model: patches padded to the longest, a key mask
        grids = [(v.shape[-2] // p, v.shape[-1] // p) for v in views]
        n = max(h * w for h, w in grids)
        patches, coord = views[0].new_zeros(len(views), n, p * p), torch.zeros(len(views), n, 2, dtype=torch.long)
        valid = torch.zeros(len(views), n, dtype=torch.bool)
        for i, (v, (h, w)) in enumerate(zip(views, grids)):
            patches[i, :h * w] = v.reshape(h, p, w, p).permute(0, 2, 1, 3).reshape(h * w, p * p)
            coord[i, :h * w] = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
            valid[i, :h * w] = True
        return net({"patches": patches, "patch_coord": coord.to(patches.device), "patch_valid": valid.to(patches.device)})
    return net, run


def _navit(cfg, views, nested: bool, volumes: bool = False):
    dims = dict(patch_size=cfg["patch"], dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"], channels=1,
                mlp_dim=int(cfg["dim"] * cfg["mlp_ratio"]), dim_head=cfg["dim"] // cfg["heads"], num_classes=cfg["dim"])
    largest = max(max(v.shape[-2:]) for v in views)
    if volumes:
        from vit_pytorch.na_vit_nested_tensor_3d import NaViT
        net = NaViT(image_size=largest, max_frames=max(v.shape[1] for v in views), frame_patch_size=cfg["patch"],
                    num_registers=0, token_dropout_prob=0.0, **dims)  # no registers: the same tokens as ours
        return net, lambda views: net(list(views))
    if nested:
        from vit_pytorch.na_vit_nested_tensor import NaViT
        net = NaViT(image_size=largest, token_dropout_prob=0.0, **dims)
        return net, lambda views: net([v[:, 0] for v in views])
    from vit_pytorch.na_vit import NaViT
    net = NaViT(image_size=largest, **dims)
    longest = max(v.shape[-2] * v.shape[-1] for v in views) // cfg["patch"] ** 2
    # rows as long as the longest view, as ours: the shortest rows its block masks allow
    return net, lambda views: net([v[:, 0] for v in views], group_images=True, group_max_seq_len=longest)


PEERS = {"2D": [("timm NaFlexViT (padded to the longest, key mask)", _timm_naflex),
                ("vit-pytorch NaViT (rows, block masks)", lambda c, v: _navit(c, v, nested=False)),
                ("vit-pytorch NaViT (nested tensors)", lambda c, v: _navit(c, v, nested=True))],
         "3D": [("vit-pytorch 3D NaViT (nested tensors)", lambda c, v: _navit(c, v, nested=True, volumes=True))]}


def _peer_step(model, run, views, device) -> float:
    """Seconds of one forward + backward of run(views) through model."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():  # as bench.py's steps
        out = run(views)
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def peer_section(args, net, views: list[torch.Tensor], device) -> list[dict]:
    """Section 8: forward + backward of the backbone alone (ours: packing included) against each peer, per
    modality, on the same views; timings interleaved so that a machine's drift hits all alike."""
    cfg, rows = net.backbone.config, []
    ours = model_lib.SparseMedicalViT(**{**cfg, "drop_path": 0.0}).to(device).train()
    ours.attn = resolve_backend("auto", device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for modality, peers in PEERS.items():
        mine = [v.to(device) for v in views if (v.shape[1] > 1) == (modality == "3D")]
        if not mine:
            continue
        runs = [("ours (packed, " + ours.attn + ")", ours, lambda vs: ours(pack(vs, cfg["patch"])))]
        step = functools.partial(_peer_step, views=mine, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peers' deprecation and prototype warnings
            for name, build in peers:
                try:  # not installed, or installed but broken: named and skipped, never the end of the bench
                    peer, run = build(cfg, mine)
                    peer = peer.to(device).train()
                    step(peer, run)  # one untimed step: fails here, not in the timing loop
                    runs.append((name, peer, run))
                except Exception as e:  # noqa: BLE001
                    rows.append({"modality": modality, "model": name, "params (M)": None, "step (s)": None,
                                 "time vs ours": None,
                                 "note": f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"})
            times = {name: [] for name, _, _ in runs}
            for i in range(args.warmup + max(1, args.repeats)):
                for name, model, run in runs:
                    sec = step(model, run)
                    if i >= args.warmup:
                        times[name].append(sec)
        base = statistics.median(times[runs[0][0]])
        for name, model, _ in runs:
            sec = statistics.median(times[name])
            rows.append({"modality": modality, "model": name,
                         "params (M)": sum(p.numel() for p in model.parameters()) / 1e6, "step (s)": sec,
                         "time vs ours": sec / base, "note": f"{len(mine)} views, {pack(mine, cfg['patch']).n_tokens:,} tokens"
                         if name.startswith("ours") else ""})
    return rows
