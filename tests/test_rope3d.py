import pytest
import torch

from rope3d import apply_rope, grid_coords, normalize_coords, rope_angles, rope_tables


@pytest.mark.parametrize("grid", [(1, 4, 5), (3, 2, 7), (1, 1, 1), (6, 1, 2)])
def test_grid_coords_match_paper_formula(grid):
    alpha = 128.0
    coords = grid_coords(*grid, alpha=alpha)
    assert coords.shape == (grid[0] * grid[1] * grid[2], 3)
    expected = [[alpha * i / max(g - 1, 1) for g, i in zip(grid, (z, y, x))]
                for z in range(grid[0]) for y in range(grid[1]) for x in range(grid[2])]  # raster (z, y, x)
    assert torch.allclose(coords, torch.tensor(expected))
    for axis, g in enumerate(grid):  # every axis spans [0, alpha], a single patch sits at 0
        assert coords[:, axis].max().item() == (alpha if g > 1 else 0.0)


def test_normalize_coords_is_per_token_formula():
    index, grid = torch.tensor([[0, 2, 3]]), torch.tensor([[1, 5, 4]])
    assert torch.allclose(normalize_coords(index, grid, 10.0), torch.tensor([[0.0, 5.0, 10.0]]))


def test_angle_layout_equal_bands_per_axis():
    head_dim = 64
    n = head_dim // 6  # 10 pairs per axis, 4 channels unrotated
    angles = rope_angles(torch.tensor([[1.0, 2.0, 3.0]]), head_dim)
    assert angles.shape == (1, 3 * n)
    inv_freq = 10000.0 ** (-torch.arange(n) / n)
    for axis, c in enumerate((1.0, 2.0, 3.0)):
        assert torch.allclose(angles[0, axis * n:(axis + 1) * n], c * inv_freq)


@pytest.mark.parametrize("head_dim", [64, 32, 30, 33])
def test_rotated_dot_product_depends_only_on_offset(head_dim):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, head_dim), torch.randn(1, 1, head_dim)
    c1, c2 = torch.tensor([[3.0, 40.0, 7.0]]), torch.tensor([[1.0, 12.0, 100.0]])
    shift = torch.tensor([[55.0, -9.0, 21.0]])

    def dot(a, b):
        return (apply_rope(q, rope_angles(a, head_dim)) * apply_rope(k, rope_angles(b, head_dim))).sum()

    assert torch.allclose(dot(c1, c2), dot(c1 + shift, c2 + shift), atol=1e-4)
    assert not torch.allclose(dot(c1, c2), dot(c1, c2 + shift), atol=1e-2)  # and it does depend on the offset


def test_rope_preserves_norm_and_unrotated_channels():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 64)
    out = apply_rope(x, rope_angles(torch.rand(5, 3) * 128, 64))
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(out[..., 60:], x[..., 60:])  # 64 - 6 * 10 = 4 channels pass through


def test_2d_grid_leaves_depth_channels_unchanged():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 64)
    out = apply_rope(x, rope_angles(grid_coords(1, 3, 4), 64))
    assert torch.equal(out[..., :20], x[..., :20])  # the 10 depth pairs rotate by angle 0
    assert not torch.allclose(out[..., 20:60], x[..., 20:60])


def test_batched_layout_and_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 48)
    angles = rope_angles(torch.rand(2, 6, 3) * 128, 48)
    flat = apply_rope(x.reshape(12, 4, 48), angles.reshape(12, -1)).reshape(2, 6, 4, 48)
    assert torch.allclose(apply_rope(x, angles), flat)
    half = apply_rope(x.bfloat16(), angles)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), flat, atol=0.05)


def test_head_dim_too_small_is_an_error():
    with pytest.raises(ValueError, match="head_dim 4"):
        rope_angles(torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match="33 rotation pairs do not fit in head_dim 64"):
        rope_tables(torch.zeros(1, 33), 64)


@pytest.mark.parametrize("head_dim", [40, 41])  # 41: odd, the last channel passes through
def test_rotation_and_its_backward_equal_the_pairwise_formula(head_dim):
    """Forward and hand-written backward (the inverse rotation) equal autograd through the plain formula."""
    torch.manual_seed(0)
    x = torch.randn(7, 3, head_dim, dtype=torch.float64, requires_grad=True)
    angles = rope_angles(torch.rand(7, 3) * 128, head_dim)
    grad = torch.randn(7, 3, head_dim, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad(apply_rope(x, angles), x, grad)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    a, b = x[..., 0:36:2], x[..., 1:36:2]
    plain = torch.cat([torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2), x[..., 36:]], -1)
    (g_plain,) = torch.autograd.grad(plain, x, grad)
    assert torch.allclose(apply_rope(x, angles), plain, atol=1e-12)  # the table form is the pairwise formula
    assert torch.allclose(g_fast, g_plain, atol=1e-12)
