"""Patchify and pack variable-length 2D/3D views into one token sequence (paper 2.1.2).

A view is a float tensor (C, Z, H, W): Z == 1 is a 2D image cut into P x P
patches, Z > 1 a volume cut into P x P x P patches. Instead of resizing or
padding every view to one shape, the patch tokens of all views of a step are
laid back to back, in the order the views were given, and attention is told
where each view starts (cu_seqlens) so views never attend to each other.

Three layouts of the same tokens:
- flat: (T, ...) with cu_seqlens (int32, N+1), for varlen / flash attention;
- dense: the tokens reordered once (dense_order) so that views of equal
  length sit side by side; each run of n views of L tokens is a plain
  (n, L) batch for SDPA with no mask at all. Multi-crop views are snapped to
  whole patches, so a step's few hundred views share a few dozen lengths,
  and no query-key pair is computed that a view does not use;
- rows: first-fit-decreasing into rows of length max_seqlen with a segment id
  per slot, for SDPA with a block-diagonal boolean mask: one call whatever
  the lengths, which is what torch.compile needs to keep one graph. Rows are
  as short as the longest view, yet only about 40% of their pairs are used.

Imports only torch: copy this file alone into another project.
"""
from dataclasses import dataclass, fields

import torch


def _patch_grid(view: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A view (C, Z, H, W) seen as (gz, gy, gx, C, [pz,] py, px) without copying, and its grid."""
    if view.ndim != 4:
        raise ValueError(f"expected a view (C, Z, H, W), got shape {tuple(view.shape)}")
    c, z, h, w = view.shape
    p = patch
    is_3d = z > 1
    if (is_3d and z % p) or h % p or w % p or 0 in (z, h, w):
        axes = "Z, H and W" if is_3d else "H and W (Z == 1: a 2D image)"
        raise ValueError(f"view of shape {tuple(view.shape)} is not a whole number of {p}-pixel patches along {axes}")
    gz, gy, gx = (z // p if is_3d else 1), h // p, w // p
    if is_3d:
        t = view.reshape(c, gz, p, gy, p, gx, p).permute(1, 3, 5, 0, 2, 4, 6)  # (gz, gy, gx, C, pz, py, px)
    else:
        t = view.reshape(c, 1, gy, p, gx, p).permute(1, 2, 4, 0, 3, 5)  # (1, gy, gx, C, py, px)
    return t, (gz, gy, gx)


def patchify(view: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut a view (C, Z, H, W) into patch tokens in raster (z, y, x) order.

    Returns tokens (gy*gx, C*P*P) for a 2D image (Z == 1) or (gz*gy*gx, C*P*P*P)
    for a volume, each patch flattened as (C, [pz,] py, px), and the grid (gz, gy, gx).
    """
    t, (gz, gy, gx) = _patch_grid(view, patch)
    return t.reshape(gz * gy * gx, -1), (gz, gy, gx)


@dataclass
class Packed:
    """All tokens of N views back to back (views in the order given, T tokens in all)."""
    patches_2d: torch.Tensor   # (T2, C*P*P) tokens of the 2D views
    patches_3d: torch.Tensor   # (T3, C*P^3) tokens of the 3D views
    index_2d: torch.Tensor     # (T2,) long: position of each 2D token in the packed sequence
    index_3d: torch.Tensor     # (T3,) long: same for 3D tokens
    patch_index: torch.Tensor  # (T, 3) long: (z, y, x) index of each token in its view's grid
    view_grid: torch.Tensor    # (N, 3) long: (gz, gy, gx) of each view
    cu_seqlens: torch.Tensor   # (N+1,) int32 start of each view; cu_seqlens[-1] == T
    token_view: torch.Tensor   # (T,) long: which view each token belongs to
    row_index: torch.Tensor    # (T,) long: slot of each token in the flattened (R, L) row layout
    row_segment: torch.Tensor  # (R, L) int32: view id per slot; padding has its own id per row
    dense_order: torch.Tensor  # (T,) long: packed positions of the tokens, views sorted by length (stable)
    dense_groups: list         # [(L, n)]: runs of n views of L tokens in dense_order, shortest first
    max_seqlen: int            # a Python int: no host sync to read it on the GPU
    seqlens: list              # tokens per view
    is_3d: list                # bool per view (a volume one patch deep still counts as 3D)

    @property
    def n_views(self) -> int:
        return self.cu_seqlens.shape[0] - 1  # a tensor size, not len(seqlens): torch.compile keeps it symbolic

    @property
    def n_tokens(self) -> int:
        return self.token_view.shape[0]

    def _map(self, fn):
        return Packed(**{f.name: fn(v) if torch.is_tensor(v := getattr(self, f.name)) else v for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "Packed":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Packed":
        return self._map(lambda t: t.pin_memory())


def pack_rows(seqlens: list[int]) -> tuple[list[int], list[int], int]:
    """First-fit-decreasing bin packing of sequences into rows of length max(seqlens).

    Returns (row, offset) of every sequence and the number of rows. The row
    length is the longest sequence, not a fixed large number: SDPA with a mask
    costs O(L^2) per row whatever is masked, so short rows waste least.
    """
    length = max(seqlens)
    free: list[int] = []  # remaining capacity of each open row
    row, offset = [0] * len(seqlens), [0] * len(seqlens)
    for i in sorted(range(len(seqlens)), key=lambda i: -seqlens[i]):
        n = seqlens[i]
        r = next((r for r, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(length)
        row[i], offset[i] = r, length - free[r]
        free[r] -= n
    return row, offset, len(free)


def dense_layout(seqlens: list[int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Token order with views sorted by length (ties in the order given), and its runs [(L, n)].

    Attention over the reordered tokens is one dense SDPA call per distinct length, each on an
    (n, H, L, D) batch without a mask: the fastest kernel, and only the pairs each view uses.
    """
    order = sorted(range(len(seqlens)), key=seqlens.__getitem__)
    starts = torch.tensor([0] + seqlens).cumsum(0)
    tokens = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order])
    groups: list[tuple[int, int]] = []
    for i in order:
        if groups and groups[-1][0] == seqlens[i]:
            groups[-1] = (seqlens[i], groups[-1][1] + 1)
        else:
            groups.append((seqlens[i], 1))
    return tokens, groups


def pack(views: list[torch.Tensor], patch: int) -> Packed:
    """Pack views (C, Z, H, W), 2D and 3D in any order, into one Packed sequence.

    Positions are stored as integer grid indices; the model turns them into
    RoPE coordinates with its own alpha (rope3d.normalize_coords), so the
    position scale lives in one place, the model.
    """
    if len(views) == 0:
        raise ValueError("pack() needs at least one view, got an empty list")
    chans = {v.shape[0] for v in views if v.ndim == 4}
    if len(chans) > 1:
        raise ValueError(f"all views must have the same number of channels, got {sorted(chans)}")
    kinds = {(v.dtype, v.device) for v in views}
    if len(kinds) > 1:
        raise ValueError(f"all views must share one dtype and device, got {sorted(map(str, kinds))}")
    patched, grids = [], []
    for i, v in enumerate(views):
        try:
            t, grid = _patch_grid(v, patch)
        except ValueError as e:
            raise ValueError(f"view {i} of {len(views)}: {e}") from None
        patched.append(t)
        grids.append(grid)
    seqlens = [gz * gy * gx for gz, gy, gx in grids]
    is_3d = [v.shape[1] > 1 for v in views]
    starts = [0]
    for n in seqlens:
        starts.append(starts[-1] + n)
    total = starts[-1]
    token_view = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(seqlens))
    view_grid = torch.tensor(grids)  # (N, 3)
    local = torch.arange(total) - torch.tensor(starts[:-1])[token_view]  # raster position in its view
    gy, gx = view_grid[token_view, 1], view_grid[token_view, 2]
    patch_index = torch.stack([local // (gy * gx), local // gx % gy, local % gx], dim=-1)

    def positions(flag: bool) -> torch.Tensor:
        idx = [torch.arange(starts[i], starts[i + 1]) for i in range(len(views)) if is_3d[i] == flag]
        return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)

    def stacked(flag: bool, dim: int) -> torch.Tensor:
        """Copy the patches of the 2D (or 3D) views straight into one buffer: a single copy per token."""
        mine = [(t, n) for t, n, f in zip(patched, seqlens, is_3d) if f == flag]
        out = views[0].new_empty(sum(n for _, n in mine), dim)
        start = 0
        for t, n in mine:
            dst = out[start:start + n].view(t.shape)
            if dst.device.type == "cpu" and dst.dtype in (torch.float32, torch.float16, torch.float64):
                # numpy's strided copy of this 6/7-D permutation is 2x (1 thread) to 20x (busy threads)
                # faster than torch's on CPU, and this copy is most of the data pipeline's cost
                dst.numpy()[...] = t.numpy()
            else:
                dst.copy_(t)
            start += n
        return out

    c = views[0].shape[0]
    row, offset, n_rows = pack_rows(seqlens)
    length = max(seqlens)
    view_slot = torch.tensor([r * length + o for r, o in zip(row, offset)])
    row_index = view_slot[token_view] + local
    row_segment = (len(views) + torch.arange(n_rows, dtype=torch.int32))[:, None].repeat(1, length)  # padding ids
    row_segment.view(-1)[row_index] = token_view.int()
    dense_order, dense_groups = dense_layout(seqlens)
    return Packed(
        patches_2d=stacked(False, c * patch**2),
        patches_3d=stacked(True, c * patch**3),
        index_2d=positions(False),
        index_3d=positions(True),
        patch_index=patch_index,
        view_grid=view_grid,
        cu_seqlens=torch.tensor(starts, dtype=torch.int32),
        token_view=token_view,
        row_index=row_index,
        row_segment=row_segment,
        dense_order=dense_order,
        dense_groups=dense_groups,
        max_seqlen=length,
        seqlens=seqlens,
        is_3d=is_3d,
    )


def to_rows(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Scatter flat tokens x (T, ...) into rows (R, L, ...); padding slots are zero."""
    r, length = packed.row_segment.shape
    rows = x.new_zeros(r * length, *x.shape[1:])
    return rows.index_copy(0, packed.row_index, x).view(r, length, *x.shape[1:])


def from_rows(rows: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Gather rows (R, L, ...) back to flat tokens (T, ...)."""
    return rows.flatten(0, 1)[packed.row_index]


def row_mask(packed: Packed) -> torch.Tensor:
    """(R, 1, L, L) boolean block-diagonal mask, True = may attend.

    Padding slots form their own segment, so every query attends at least to
    itself and no softmax row is empty (an empty one gives NaN on some kernels).
    """
    seg = packed.row_segment
    return (seg[:, :, None] == seg[:, None, :])[:, None]


def segment_mean(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Mean of the tokens of each view: x (T, D) -> (N, D), in the order views were given.

    Summed in float32 whatever x's dtype: a bf16 sum of a few hundred tokens (and a bf16 count,
    273 -> 272) would cost more precision than rounding the mean once.
    """
    n = packed.n_views
    acc = torch.promote_types(x.dtype, torch.float32)
    sums = x.new_zeros(n, x.shape[1], dtype=acc).index_add(0, packed.token_view, x.to(acc))
    counts = torch.diff(packed.cu_seqlens).to(acc)
    return (sums / counts[:, None]).to(x.dtype)
