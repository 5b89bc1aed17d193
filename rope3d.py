"""3D rotary position embeddings over normalized grid coordinates (paper 2.1.1).

Every view, 2D or 3D, is a grid of patch tokens (gz, gy, gx) in raster order
(z, y, x). Each axis is normalized to [0, alpha] whatever its resolution, so
a 224-pixel image and a 56-pixel crop span the same coordinate range and a 2D
image (gz == 1) sits in the depth-0 plane of the shared 3D space.

The head dimension is split equally over the three axes: each axis gets
n = head_dim // 6 rotation pairs (2n channels). The remaining
head_dim - 6n channels are passed through unrotated (head_dim 64 gives
3 x 10 pairs and 4 plain channels), so any even or odd head_dim works.

Imports only torch: copy this file alone into another project.
"""
import torch


def normalize_coords(index: torch.Tensor, grid: torch.Tensor, alpha: float = 128.0) -> torch.Tensor:
    """Float32 coordinates of patches: index and grid are (..., 3) integer (z, y, x).

    paper 2.1.1: coord(i) = alpha * i / max(g - 1, 1) per axis, so every view
    spans [0, alpha] whatever its size, and an axis of size 1 sits at 0.
    """
    return alpha * index.float() / (grid.float() - 1).clamp(min=1)


def grid_index(gz: int, gy: int, gx: int, device=None) -> torch.Tensor:
    """(gz*gy*gx, 3) integer (z, y, x) indices of a patch grid in raster order."""
    axes = [torch.arange(g, device=device) for g in (gz, gy, gx)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def grid_coords(gz: int, gy: int, gx: int, alpha: float = 128.0, device=None) -> torch.Tensor:
    """(gz*gy*gx, 3) float32 coordinates (z, y, x) of a patch grid in raster order."""
    grid = torch.tensor([gz, gy, gx], device=device)
    return normalize_coords(grid_index(gz, gy, gx, device), grid, alpha)


def rope_angles(coords: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles (..., 3 * n) for coords (..., 3), n = head_dim // 6 pairs per axis.

    Pair k of an axis rotates by coord * base ** (-k / n): equal frequency
    bands for z, y and x (paper 2.1.1). Float32 throughout: CT depth and
    alpha = 128 make angles large, and bf16 would round them to garbage.
    """
    n = head_dim // 6
    if n == 0:
        raise ValueError(f"head_dim {head_dim} is too small for 3D RoPE: need at least 6 channels")
    inv_freq = base ** (-torch.arange(n, device=coords.device, dtype=torch.float32) / n)  # (n,)
    angles = coords.float()[..., :, None] * inv_freq  # (..., 3, n)
    return angles.flatten(-2)  # (..., 3n): z pairs, then y pairs, then x pairs


def rope_tables(angles: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width float32 tables (..., head_dim) of the rotation by angles (..., R), 2R <= head_dim.

    Pair j (channels 2j, 2j+1) rotates by angles[..., j]:
        (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) = x * cos_table + swap(x) * sin_table
    with swap(x0, x1) = (x1, x0), cos_table = (cos, cos) and sin_table = (-sin, +sin) per pair.
    The unrotated tail channels get cos 1 and sin 0. Computed once per forward, shared by all layers.
    """
    r = angles.shape[-1]
    if 2 * r > head_dim:
        raise ValueError(f"{r} rotation pairs do not fit in head_dim {head_dim}")
    cos, sin = angles.float().cos(), angles.float().sin()
    tail = head_dim - 2 * r
    cos = torch.cat([cos.repeat_interleave(2, -1), cos.new_ones(*cos.shape[:-1], tail)], -1)
    sin = torch.cat([torch.stack([-sin, sin], -1).flatten(-2), sin.new_zeros(*sin.shape[:-1], tail)], -1)
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + swap(x) * sin in float32 (at least), stored in x's dtype; tables broadcast over heads.

    Written for few passes over x in eager mode, where this memory-bound op costs what it moves:
    the products promote to float32 on the fly (no float32 copy of x), and addcmul writes its
    float32 result straight into x's dtype. 18 bytes per bf16 element plus the tables (20 at 4
    heads) against 57.5 for a stack-and-concatenate form in float32 (counted in tests/test_bench.py).
    """
    d = x.shape[-1] - x.shape[-1] % 2
    pairs, swapped = x[..., :d].unflatten(-1, (-1, 2)), torch.empty_like(x)
    into = swapped[..., :d].unflatten(-1, (-1, 2))  # (x1, x0) for every pair (x0, x1): two strided copies,
    into[..., 0].copy_(pairs[..., 1])               # 6x faster than flip(-1) on a CPU
    into[..., 1].copy_(pairs[..., 0])
    if d < x.shape[-1]:  # odd head_dim: the last channel is unrotated (sin 0), any value will do
        swapped[..., d:] = x[..., d:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., 1, D): the same rotation for every head
    return torch.addcmul(x * cos, swapped, sin, out=torch.empty_like(x))


class _Rotate(torch.autograd.Function):
    """A rotation is orthogonal: its backward is the inverse rotation of the gradient.

    So autograd keeps only the tables (shared by every layer), not the float32 products that the
    forward makes: less memory, less traffic.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., H, D) by the tables (..., D) of rope_tables, made once and reused by every layer."""
    return _Rotate.apply(x, cos, sin)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * angles.shape[-1] channels of x by angles; the rest pass through.

    x: (T, H, D) or (B, L, H, D); angles: (T, R) or (B, L, R) with 2R <= D.
    Channel pairs are (2j, 2j+1), rotated by angles[..., j]. Computed in
    (at least) float32 and returned in x's dtype.
    """
    return rotate(x, *rope_tables(angles, x.shape[-1]))
