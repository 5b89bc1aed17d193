import random

import pytest
import torch

from pack import from_rows, pack, pack_rows, patchify, row_mask, segment_mean, to_rows

P = 14


def random_views(n, seed=0, max_side=4):
    """A random mix of 2D images and 3D volumes of whole-patch shapes."""
    rng = random.Random(seed)
    views = []
    for _ in range(n):
        z = 1 if rng.random() < 0.5 else rng.randint(1, max_side) * P  # 2D image, or volume (one patch deep too)
        views.append(torch.randn(1, z, rng.randint(1, max_side) * P, rng.randint(1, max_side) * P))
    return views


def test_patchify_2d_raster_order():
    img = torch.arange(28 * 42, dtype=torch.float32).view(1, 1, 28, 42)
    tokens, grid = patchify(img, P)
    assert grid == (1, 2, 3) and tokens.shape == (6, P * P)
    # token 4 = row 1, column 1: its first pixel is (14, 14)
    assert tokens[4, 0] == img[0, 0, 14, 14] and tokens[4, P] == img[0, 0, 15, 14]


def test_patchify_3d_raster_order():
    vol = torch.randn(1, 28, 14, 28)
    tokens, grid = patchify(vol, P)
    assert grid == (2, 1, 2) and tokens.shape == (4, P**3)
    assert torch.equal(tokens[3].view(P, P, P), vol[0, 14:, :, 14:])  # token (z=1, y=0, x=1)


@pytest.mark.parametrize("shape", [(1, 1, 15, 14), (1, 1, 14, 0), (1, 20, 14, 14), (1, 14)])
def test_patchify_rejects_partial_patches(shape):
    with pytest.raises(ValueError, match=r"shape|patch"):
        patchify(torch.zeros(shape), P)


def test_pack_bookkeeping():
    views = random_views(9, seed=1)
    packed = pack(views, P)
    lens = [patchify(v, P)[0].shape[0] for v in views]
    assert packed.seqlens == lens and packed.max_seqlen == max(lens)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert packed.n_tokens == sum(lens) == len(packed.patches_2d) + len(packed.patches_3d)
    # the 2D and 3D index lists partition the sequence, and map each token to its own view's patches
    assert sorted(torch.cat([packed.index_2d, packed.index_3d]).tolist()) == list(range(sum(lens)))
    for i, v in enumerate(views):
        tokens, grid = patchify(v, P)
        assert packed.view_grid[i].tolist() == list(grid)
        span = torch.arange(packed.cu_seqlens[i], packed.cu_seqlens[i + 1])
        source, index = (packed.patches_3d, packed.index_3d) if v.shape[1] > 1 else (packed.patches_2d, packed.index_2d)
        rows = torch.nonzero(torch.isin(index, span)).squeeze(1)
        assert torch.equal(source[rows], tokens)
        assert (packed.token_view[span] == i).all()


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        pack([], P)
    with pytest.raises(ValueError, match="channels"):
        pack([torch.zeros(1, 1, 14, 14), torch.zeros(2, 1, 14, 14)], P)
    with pytest.raises(ValueError, match=r"view 1 of 2: .*\(1, 1, 14, 15\)"):  # names the view and its shape
        pack([torch.zeros(1, 1, 14, 14), torch.zeros(1, 1, 14, 15)], P)
    with pytest.raises(ValueError, match=r"view 0 of 1: .*\(1, 0, 14, 14\)"):  # an empty volume, not a 2D image
        pack([torch.zeros(1, 0, 14, 14)], P)
    with pytest.raises(ValueError, match="one dtype and device"):
        pack([torch.zeros(1, 1, 14, 14), torch.zeros(1, 1, 14, 14, dtype=torch.bfloat16)], P)


def test_row_packing_places_every_token_once_in_short_rows():
    for seed in range(5):
        views = random_views(30, seed=seed)
        packed = pack(views, P)
        r, length = packed.row_segment.shape
        assert length == packed.max_seqlen  # rows never longer than the longest view
        assert len(set(packed.row_index.tolist())) == packed.n_tokens  # every token in its own slot
        assert r * length >= packed.n_tokens
        # the segment id in each token's slot is the token's view
        assert torch.equal(packed.row_segment.view(-1)[packed.row_index].long(), packed.token_view)
        # tokens of one view stay contiguous and in order within one row
        for i in range(len(views)):
            slots = packed.row_index[packed.token_view == i]
            assert torch.equal(slots, torch.arange(slots[0], slots[0] + len(slots)))
            assert slots[0] // length == slots[-1] // length


def test_first_fit_decreasing_is_tight_for_complementary_lengths():
    row, offset, n_rows = pack_rows([5, 1, 4, 2, 3])
    assert n_rows == 3  # 5 | 4+1 | 3+2
    assert offset[0] == 0 and row[2] == row[1] and row[4] == row[3]


def test_dense_layout_sorts_views_by_length_into_contiguous_equal_length_runs():
    views = random_views(15, seed=3)
    views += [torch.randn_like(views[2]), torch.randn_like(views[2])]
    packed = pack(views, P)
    order = packed.dense_order
    assert sorted(order.tolist()) == list(range(packed.n_tokens))  # a permutation of the tokens
    lengths = [n for n, _ in packed.dense_groups]
    assert lengths == sorted(set(packed.seqlens))  # one run per distinct length, shortest first
    assert sum(n * length for length, n in packed.dense_groups) == packed.n_tokens
    view_of = packed.token_view[order]
    start = 0
    for length, n in packed.dense_groups:
        run = view_of[start:start + n * length].view(n, length)
        assert (run == run[:, :1]).all()  # each row of the run is one whole view ...
        assert all(packed.seqlens[i] == length for i in run[:, 0].tolist())  # ... of that length
        assert torch.equal(order[start:start + n * length].view(n, length)[:, 0],
                           packed.cu_seqlens[run[:, 0]].long())  # in its raster order
        start += n * length
    assert run[:, 0].tolist() == sorted(run[:, 0].tolist())  # ties keep the order given


def test_rows_round_trip_and_padding_never_nan():
    torch.manual_seed(0)
    packed = pack(random_views(12, seed=3), P)
    x = torch.randn(packed.n_tokens, 4, 8)
    rows = to_rows(x, packed)
    assert torch.equal(from_rows(rows, packed), x)
    mask = row_mask(packed)
    assert mask.shape[1] == 1 and mask.any(-1).all()  # every query, padding too, attends somewhere
    q = rows.transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_segment_mean():
    packed = pack([torch.zeros(1, 1, 28, 14), torch.zeros(1, 14, 14, 14)], P)
    x = torch.tensor([[1.0], [3.0], [7.0]])
    assert torch.equal(segment_mean(x, packed), torch.tensor([[2.0], [7.0]]))


def test_segment_mean_of_bf16_tokens_sums_in_float32():
    packed = pack([torch.zeros(1, 1, 14 * 21, 14 * 13)], P)  # one view of 273 tokens: 273 is not a bf16 number
    x = (1 + torch.rand(273, 8, generator=torch.Generator().manual_seed(0))).bfloat16()
    got = segment_mean(x, packed)
    want = x.float().mean(0, keepdim=True)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, rtol=2**-8, atol=0)  # within one bf16 rounding of the true mean
