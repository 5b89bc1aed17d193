"""SparseMedicalViT: one transformer for 2D radiographs and 3D CT (paper 2.1).

The model sees a Packed batch (pack.py): the patch tokens of every view of a
step back to back. One patch embedding P^3 -> dim serves both modalities, 3D
RoPE (rope3d.py) places every token in one shared [0, alpha]^3 coordinate
space, and each attention layer runs once over the whole packed sequence with
views kept apart by cu_seqlens (varlen / flash), by dense batches of
equal-length views (sdpa, eager) or by block-diagonal row masks (sdpa under
torch.compile). The output is one embedding per view: the mean of its
final-normed tokens.
"""
import importlib.util
import os
import pickle
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pack import Packed, from_rows, pack, row_mask, segment_mean, to_rows
from rope3d import normalize_coords, rope_angles, rope_tables, rotate

CKPT_FORMAT = 1  # version of the checkpoint dict that train.py writes; bump on incompatible change
PRESETS = {
    "tiny": dict(dim=192, depth=12, heads=3),
    "small": dict(dim=384, depth=12, heads=6),
    "base": dict(dim=768, depth=12, heads=12),
}
BACKENDS = ("sdpa", "varlen", "flash", "flex")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Attention backends that can run on this machine for tensors on `device`."""
    kind = torch.device(device).type
    if kind not in _FOUND:  # asked on every forward: look the packages up once per device type
        _FOUND[kind] = _find_backends(kind)
    return list(_FOUND[kind])


_FOUND: dict[str, tuple] = {}  # a plain dict, not functools.lru_cache: torch.compile traces it without warnings


def _find_backends(device_type: str) -> tuple:
    names = ["sdpa"]
    cuda = device_type == "cuda" and torch.cuda.is_available()
    if cuda and importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        names.append("varlen")
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        names.append("flash")
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        names.append("flex")
    return tuple(names)


def resolve_backend(attn: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' is varlen on CUDA in half precision, sdpa otherwise; explicit names are checked."""
    if attn not in BACKENDS + ("auto",):
        raise ValueError(f"unknown attention backend {attn!r}; choose from {('auto',) + BACKENDS}")
    have = available_backends(device)
    if attn == "auto":
        return "varlen" if "varlen" in have and dtype in (torch.float16, torch.bfloat16) else "sdpa"
    if attn not in have:
        why = "needs CUDA" if attn in ("varlen", "flash") and device.type != "cuda" else "is not installed"
        raise ValueError(f"attention backend {attn!r} {why} on this machine ({device.type}); available: {have}")
    if attn in ("varlen", "flash") and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {attn!r} runs in fp16/bf16 only, got {dtype}; use bf16 autocast or attn='sdpa'")
    return attn


def attention_mask(packed: Packed, backend: str, device, rows: bool = False):
    """What a backend needs to keep views apart, built once per forward and shared by every layer.

    sdpa: None for the dense layout (pack.dense_layout: no mask at all), or with rows the
    (R, 1, L, L) block-diagonal row masks: one call per layer whatever the lengths, one graph
    under torch.compile, at the cost of the ~60% of pairs that rows compute and mask away.
    """
    if backend == "sdpa":
        return row_mask(packed) if rows else None
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        view = packed.token_view
        same_view = lambda b, h, qi, ki: view[qi] == view[ki]  # noqa: E731
        return create_block_mask(same_view, None, None, len(view), len(view), device=device)
    return None  # varlen / flash read cu_seqlens


def dense_attention(q, k, v, groups: list[tuple[int, int]]) -> torch.Tensor:
    """Attention of q, k, v (T, H, D) in the dense layout: each run of n views of L tokens -> (T, H, D).

    split (not slicing) so that backward joins the gradients with one cat; transposes, not copies:
    SDPA reads (n, H, L, D) through strides.
    """
    sizes = [n * length for length, n in groups]
    out = []
    for (length, n), *qkv in zip(groups, q.split(sizes), k.split(sizes), v.split(sizes)):
        rows = [t.view(n, length, *t.shape[1:]).transpose(1, 2) for t in qkv]  # (n, H, L, D)
        out.append(F.scaled_dot_product_attention(*rows).transpose(1, 2).reshape(n * length, *q.shape[1:]))
    return torch.cat(out)


def packed_attention(q, k, v, packed: Packed, backend: str, mask=None) -> torch.Tensor:
    """Attention of q, k, v (T, H, D) within each view of the packed sequence -> (T, H, D).

    sdpa without a mask expects the tokens in dense_order (forward_features reorders them once).
    """
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn
        cu = packed.cu_seqlens
        return varlen_attn(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func
        cu = packed.cu_seqlens
        return flash_attn_varlen_func(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        out = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask)  # (1, H, T, D)
        return out[0].transpose(0, 1)
    if mask is None:
        return dense_attention(q, k, v, packed.dense_groups)
    # sdpa rows of length max_seqlen, each a block-diagonal mask (True = attend)
    rows = [to_rows(t, packed).transpose(1, 2) for t in (q, k, v)]  # (R, H, L, D)
    out = F.scaled_dot_product_attention(*rows, attn_mask=mask)
    return from_rows(out.transpose(1, 2), packed)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, packed, backend, mask):
        t, d = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, d // self.heads).unbind(1)  # (T, H, hd) each
        q, k = rotate(q, *rope), rotate(k, *rope)  # paper 2.1.1: 3D RoPE on q and k in every layer
        v = v.contiguous()  # q and k are new tensors now: a view v kept for backward would keep all of qkv alive
        return self.proj(packed_attention(q, k, v, packed, backend, mask).reshape(t, d))


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype under autocast (statistics still in float32).

    Autocast runs layer_norm in float32: it casts the bf16 residual up, and the next linear casts
    the float32 output back down, two extra passes over the activations per norm (a tenth of the
    bytes an eager `base` step moves) and a float32 copy of the input kept for backward. The native
    kernel already accumulates in float32, and the linear gets the same bf16 input either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type) or x.dtype == torch.float32:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Block(nn.Module):
    """Pre-norm transformer block with per-view stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def drop_views(self, token_view: torch.Tensor, n_views: int, y: torch.Tensor) -> torch.Tensor:
        """Stochastic depth that drops whole views, not the whole pack: one Bernoulli draw per view."""
        if not self.training or self.drop_path == 0.0:
            return y  # no multiply by 1: a full pass over the activations for nothing
        keep = 1.0 - self.drop_path
        per_view = torch.bernoulli(torch.full((n_views,), keep, device=y.device)) / keep
        return y * per_view[token_view].to(y.dtype)[:, None]

    def forward(self, x, rope, token_view, packed, backend, mask):
        """x (T, dim) in the packed order or in dense_order; token_view says which view each row is."""
        x = x + self.drop_views(token_view, packed.n_views, self.attn(self.norm1(x), rope, packed, backend, mask))
        return x + self.drop_views(token_view, packed.n_views, self.mlp(self.norm2(x)))


class SparseMedicalViT(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, patch: int = 14,
                 in_chans: int = 1, rope_alpha: float = 128.0, rope_base: float = 10000.0,
                 attn: str = "auto", drop_path: float = 0.0, input_stats: list | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.config = dict(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=patch, in_chans=in_chans,
                           rope_alpha=rope_alpha, rope_base=rope_base, attn=attn, drop_path=drop_path,
                           input_stats=input_stats)
        # train.py --standardize: [[mean, std] of 2D, [mean, std] of 3D] intensities, applied before the patch
        # embedding so that the weights, the checkpoint and every reader of it agree; None: the paper's inputs
        self.input_stats = input_stats
        self.dim, self.patch, self.in_chans, self.attn = dim, patch, in_chans, attn
        self.rope_alpha, self.rope_base, self.head_dim = rope_alpha, rope_base, dim // heads
        # fail at construction, not at the first step, for a backend this machine cannot run
        resolve_backend(attn, torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16)
        # paper 2.1.1: one linear map of flattened P^3 patches, shared by 2D and 3D
        self.patch_embed = nn.Linear(in_chans * patch**3, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop_path * i / max(depth - 1, 1)) for i in range(depth))
        self.norm = nn.LayerNorm(dim)  # float32 under autocast: the view mean (segment_mean) sums in float32
        self.grad_checkpointing = False  # train.py --act-ckpt: fit the paper's batch of `base` on one GPU
        self.sdpa_rows = False  # sdpa in eager mode: dense layout (False) or masked rows (as under torch.compile)
        self.apply(_init_weights)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SparseMedicalViT":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def embed(self, packed: Packed) -> torch.Tensor:
        """Patch embedding of every token -> (T, dim).

        paper 2.1.1: a 2D image is a pseudo-volume zero-padded to P slices,
        image in slice 0. Zero slices contribute nothing to the linear map,
        so a 2D patch needs only the depth-0 slice of the weight: the same
        result with P times fewer FLOPs and bytes than building the padding.
        """
        c, p = self.in_chans, self.patch
        for name, tokens, size in (("2D", packed.patches_2d, c * p * p), ("3D", packed.patches_3d, c * p**3)):
            if tokens.shape[-1] != size:
                raise ValueError(f"{name} patches have {tokens.shape[-1]} values, expected {size} "
                                 f"({c} channel(s) x {p}-pixel patches): check in_chans and patch")
        p2, p3 = packed.patches_2d, packed.patches_3d
        if self.input_stats:  # each modality's intensities to zero mean, unit variance (the padding stays zero)
            (m2, s2), (m3, s3) = self.input_stats
            p2, p3 = (p2 - m2) / s2, (p3 - m3) / s3
        w3, b = self.patch_embed.weight, self.patch_embed.bias  # (dim, C*P^3)
        w2 = w3.view(self.dim, c, p, p, p)[:, :, 0].reshape(self.dim, c * p * p)
        e2, e3 = F.linear(p2, w2, b), F.linear(p3, w3, b)
        x = e3.new_zeros(packed.n_tokens, self.dim)
        return x.index_copy(0, packed.index_2d, e2).index_copy(0, packed.index_3d, e3)

    def forward_features(self, packed: Packed) -> torch.Tensor:
        """Final-normed token features (T, dim) in packed order (for pooling and PCA maps)."""
        x = self.embed(packed)
        backend = resolve_backend(self.attn, x.device, _compute_dtype(x))
        # one graph for every batch under torch.compile: the dense layout's loop over lengths would recompile
        rows = self.sdpa_rows or torch.compiler.is_compiling()
        mask = attention_mask(packed, backend, x.device, rows=rows)
        dense = backend == "sdpa" and not rows
        token_view, patch_index = packed.token_view, packed.patch_index
        if dense:  # reorder the tokens once, not in every layer: everything but attention is per token
            order = packed.dense_order
            x, token_view, patch_index = x.index_select(0, order), token_view[order], patch_index[order]
        grid = packed.view_grid[token_view]  # (T, 3)
        angles = rope_angles(normalize_coords(patch_index, grid, self.rope_alpha), self.head_dim, self.rope_base)
        rope = rope_tables(angles, self.head_dim)  # float32 cos and sin (T, head_dim), shared by all layers
        for block in self.blocks:
            if self.grad_checkpointing and self.training:  # recompute activations in backward: memory for FLOPs
                x = torch.utils.checkpoint.checkpoint(block, x, rope, token_view, packed, backend, mask,
                                                      use_reentrant=False)
            else:
                x = block(x, rope, token_view, packed, backend, mask)
        x = self.norm(x)
        return torch.empty_like(x).index_copy(0, packed.dense_order, x) if dense else x

    def forward(self, packed: Packed) -> torch.Tensor:
        """One embedding per view (N, dim), in the order the views were given."""
        return segment_mean(self.forward_features(packed), packed)

    @torch.inference_mode()
    def encode(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Frozen embeddings of whole images and volumes -> (N, dim) float32 on the CPU, in the order given.

        For use in other code: views are float tensors (1, Z, H, W), Z == 1 for a radiograph, preprocessed as
        the model was trained (paper 2.4, data.py: X-ray long side 224, min-max to [-1, 1]; CT in HU,
        isotropic voxels, long side 112, window L=250 W=2500 to [-1, 1]) and cut to whole patches on every
        patched axis (data.whole_view centre-crops). Any mix of sizes and modalities goes through one packed
        forward on the model's device (bf16 autocast on CUDA): pass as many as fit in memory at a time
        (probe.py batches under a token budget). Call it on a model in eval mode (backbone_from_checkpoint's).
        """
        device = self.patch_embed.weight.device
        packed = pack(views, self.patch).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return self(packed).float().cpu()


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a train.py checkpoint safely (weights_only: unpickling never runs code) and check its format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its end is its directory
        raise ValueError(f"{path}: not a readable checkpoint: not a file written by torch.save, or truncated")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own advice (weights_only=False) would run the file's code
        raise ValueError(f"{path}: not a readable checkpoint: it holds objects other than tensors and plain data, "
                         f"which are never unpickled here") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt): {str(e).splitlines()[0]}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a MultiMedVision checkpoint (no 'model' and 'model_config' entries)")
    if ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {ckpt.get('format')!r}, this code reads format {CKPT_FORMAT}")
    return ckpt


def backbone_from_checkpoint(path, map_location="cpu", **overrides) -> tuple["SparseMedicalViT", dict]:
    """The frozen-feature backbone of a checkpoint (eval mode) and the checkpoint dict."""
    ckpt = load_checkpoint(path, map_location)
    model = SparseMedicalViT(**{**ckpt["model_config"], **overrides})
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


class Projector(nn.Module):
    """MLP head for the self-supervised loss: embedding -> 2048 -> 2048 -> 128 (the paper names no projector;
    LeJEPA's loss is computed on one, paper 2.2, and these sizes are ours).

    norm "batch" (default): BatchNorm over the step's views, as the official LeJEPA example's projector, over the
    global batch under DDP; norm "layer": per-sample LayerNorm. The paper names neither; BatchNorm measured better
    on validation phantoms (results/recipe).
    """

    def __init__(self, dim: int, hidden: int = 2048, out: int = 128, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"Projector: norm must be one of {sorted(NORMS)}, got {norm!r}")
        self.net = nn.Sequential(nn.Linear(dim, hidden), NORMS[norm](hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), NORMS[norm](hidden), nn.GELU(),
                                 nn.Linear(hidden, out))
        self.apply(_init_weights)

    def forward(self, x):
        return self.net(x)


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the global batch: under torch.distributed each rank's sums are all-reduced (autograd-aware,
    as SIGReg's ECF in lejepa.py), so N processes normalize by the same statistics and take the same update as
    one process; SyncBatchNorm does this on GPUs only, this on every backend, gloo included. On one process,
    or in eval mode, it is nn.BatchNorm1d (tested)."""

    def forward(self, x):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable: its backward sums over ranks

        xf = x.float()
        n = torch.tensor(float(x.shape[0]), device=x.device)
        dist.all_reduce(n)
        mean = all_reduce(xf.sum(0)) / n  # two passes, as the fused kernel: no E[x^2] - E[x]^2 cancellation
        var = all_reduce((xf - mean).square().sum(0)) / n
        with torch.no_grad():  # running statistics as nn.BatchNorm1d keeps them (unbiased variance)
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


NORMS = {"layer": nn.LayerNorm, "batch": BatchNorm}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls will run in: the autocast dtype when autocast is on."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def model_flops_per_token(config: dict, seqlens: list[int]) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, per token on average.

    Matmuls only: 2 FLOPs per multiply-add. Per layer and token: qkv + proj
    4 d^2, MLP 2 r d^2, attention 2 * 2 * L * d for a view of L tokens.
    """
    d, r, depth = config["dim"], config["mlp_ratio"], config["depth"]
    tokens = sum(seqlens)
    dense = 2 * (4 + 2 * r) * d * d * tokens
    attn = 2 * 2 * d * sum(n * n for n in seqlens)
    return 3 * depth * (dense + attn) / max(tokens, 1)
