"""Multi-crop views and the mixed 2D/3D loader (paper 2.4.1): what one training step reads.

- Views: make_views cuts n_global global and n_local local random crops of a Record's image, 2D and 3D alike,
  at native resolution and snapped to whole patches; photometric adds the official LeJEPA example's
  brightness, contrast, blur and solarization (train.py --photometric; beyond the paper, off by default);
  whole_view is the full image centre-cropped to whole patches, the one view the probes see (features.py).
- Paired views (train.py --paired-views; beyond the paper, off by default): the last few local views of every
  CT sample become crops of its DRR (data.drr_record), so the prediction loss pulls the patient's radiograph
  and CT to one point; one sample, views of two dimensionalities, one packed sequence.
- Loader: make_loader yields one Batch per step, 2D samples then 3D, their views packed (pack.py) inside the
  worker processes; the content of step s is a pure function of (seed, s) whatever the rank, the world size
  or where a run resumed (StepDataset).

Imports data (Record: the images data.py preprocesses and caches; drr_record for paired views), pack, numpy
and torch; data.py does not import this module.
"""
import math
import signal
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from data import XRAY_SIZE, Record, drr_record
from pack import Packed, pack

# ---------------------------------------------------------------- views (paper 2.4.1)

def _patched(shape) -> np.ndarray:
    """Which axes of (Z, H, W) are cut into patches: all three for a volume, H and W for a 2D image."""
    return np.array([shape[0] > 1, True, True])


def make_views(image: np.ndarray, rng: np.random.Generator, patch: int, n_global: int = 2, n_local: int = 8,
               global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), ratio=(3 / 4, 4 / 3), local_grid: int = 0,
               zoom: float = 0.0) -> list:
    """paper 2.4.1: n_global global then n_local local random crops, 2D and 3D alike.

    A crop covers a fraction `scale` of the image's area (2D) or volume (3D),
    its sides jittered around the image's own proportions (each pair of sides
    within `ratio`), kept at native resolution (no resizing) and snapped to
    whole patches, at least one per axis. Returns tensors (1, z, h, w).
    local_grid > 0 (train.py --local-grid; beyond the paper): every local crop is resized to local_grid
    patches per patched axis, as the official LeJEPA example resizes its local crops to a fixed size.
    zoom > 1 (train.py --zoom; beyond the paper): each view (but a local one local_grid fixes) is rescaled by
    its own factor, log-uniform in [1/zoom, zoom], and snapped to whole patches again, so the anatomy's apparent
    size differs between the views of one image. The factors are drawn after the crops: the crops are the same
    with or without.
    """
    if zoom and zoom <= 1:
        raise ValueError(f"zoom must be 0 (off) or > 1, got {zoom}")
    dims = np.array(image.shape)
    patched = _patched(dims)
    grid = dims[patched] // patch
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))  # torch copies crops ~2x faster
    if grid.min() < 1:
        raise ValueError(f"image {tuple(dims)} is smaller than one {patch}-pixel patch")
    views = []
    for k in range(n_global + n_local):
        lo, hi = global_scale if k < n_global else local_scale
        scale = rng.uniform(lo, hi)
        jitter = rng.uniform(math.log(ratio[0]) / 2, math.log(ratio[1]) / 2, patched.sum())
        side = dims[patched] * scale ** (1 / patched.sum()) * np.exp(jitter - jitter.mean())
        size = dims.copy()
        size[patched] = np.clip(np.rint(side / patch), 1, grid).astype(int) * patch
        start = [rng.integers(0, d - s + 1) for d, s in zip(dims, size)]
        crop = source[tuple(slice(a, a + s) for a, s in zip(start, size))]
        if local_grid and k >= n_global:  # beyond the paper: a fixed token count per local view
            crop = _resized(crop, np.full(patched.sum(), local_grid * patch), patched)
        views.append(crop)
    if zoom:  # beyond the paper: the apparent size varies per view (results/nuisance)
        factors = np.exp(rng.uniform(-math.log(zoom), math.log(zoom), len(views)))
        for k, f in enumerate(factors):
            if not (local_grid and k >= n_global):
                side = np.array(views[k].shape)[patched]
                views[k] = _resized(views[k], np.maximum(np.rint(side * f / patch), 1).astype(int) * patch, patched)
    return [v.clone(memory_format=torch.contiguous_format)[None] for v in views]


def _resized(crop: torch.Tensor, size, patched: np.ndarray) -> torch.Tensor:
    """A crop (z, h, w) resampled to `size` along its patched axes (linear interpolation; a 2D crop keeps z = 1)."""
    x = crop[None, None] if patched[0] else crop[None]  # (1, 1, z, h, w) or (1, 1, h, w)
    x = F.interpolate(x, size=tuple(int(n) for n in size), mode="trilinear" if patched[0] else "bilinear",
                      align_corners=False)
    return x[0, 0] if patched[0] else x[0]


# Paper 2.4.1 names only the multi-crop, the default. Optional (train.py --photometric): the official
# LeJEPA example's photometric views (ColorJitter(0.8, 0.8) with p 0.8, GaussianBlur 7 taps, sigma
# 0.1-2 px, p 0.5, solarize p 0.2), without hue and saturation (grey images) and without its
# horizontal flip (left and right are anatomy in a chest). On the phantoms it cost 2D AUROC and
# embedding rank at 1000 steps (results/collapse.md), so it is off unless asked for.
JITTER, JITTER_P, BLUR_SIGMA, BLUR_TAPS, BLUR_P, SOLARIZE_P = 0.8, 0.8, (0.1, 2.0), 7, 0.5, 0.2


def photometric(view: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random brightness and contrast, Gaussian blur and solarization of a view (1, z, h, w) in [-1, 1].

    Computed on [0, 1] as torchvision does; 2D images are blurred in-plane, volumes along all three axes.
    """
    x = (view + 1) / 2
    if rng.random() < JITTER_P:
        x = (x * rng.uniform(1 - JITTER, 1 + JITTER)).clamp(0, 1)  # brightness
        mean = x.mean()
        x = ((x - mean) * rng.uniform(1 - JITTER, 1 + JITTER) + mean).clamp(0, 1)  # contrast
    if rng.random() < BLUR_P:
        sigma, r = rng.uniform(*BLUR_SIGMA), BLUR_TAPS // 2
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
        k = k / k.sum()
        x = x[None]  # (1, 1, z, h, w)
        for axis in range(2 if view.shape[1] == 1 else 1, 5):  # separable: one 1D pass per patched axis
            if x.shape[axis] <= r:
                continue
            shape = [1, 1, 1, 1, 1]
            shape[axis] = len(k)
            pad = [0] * 6
            pad[2 * (4 - axis)], pad[2 * (4 - axis) + 1] = r, r
            x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
        x = x[0]
    if rng.random() < SOLARIZE_P:
        x = torch.where(x >= 0.5, 1 - x, x)
    return x * 2 - 1


def gamma_jitter(view: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Another intensity calibration for a view (1, z, h, w) in [-1, 1]: x -> x^g on [0, 1], with log g uniform in
    [-log(1 + strength), log(1 + strength)]. Every crop of a sample shares its acquisition's response curve (a
    detector's gamma, a CT's calibration), so crop invariance alone rewards encoding it; varying it per view
    takes that shortcut away (train.py --gamma; beyond the paper; MONAI's RandAdjustContrast is the same map)."""
    g = float(np.exp(rng.uniform(-np.log1p(strength), np.log1p(strength))))
    return ((view + 1) / 2).clamp(0, 1).pow(g) * 2 - 1


def whole_view(record: Record, patch: int) -> torch.Tensor:
    """The full image (1, Z, H, W), centre-cropped to whole patches (Z kept when Z == 1)."""
    dims = np.array(record.image.shape)
    size = np.where(_patched(dims), dims // patch * patch, dims)
    if size.min() < 1:
        raise ValueError(f"{record.id}: image {tuple(dims)} is smaller than one {patch}-pixel patch")
    start = (dims - size) // 2
    crop = record.image[tuple(slice(a, a + s) for a, s in zip(start, size))]
    return torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None]


# ---------------------------------------------------------------- mixed 2D/3D loader

@dataclass
class Batch:
    packed: Packed        # views in view-major order: view v of local sample n is packed index v * n_samples + n
    labels: torch.Tensor  # (n_samples, 5) float32, NaN unknown
    is_3d: torch.Tensor   # (n_samples,) bool; local samples are 2D first, then 3D
    n_samples: int
    n_views: int          # views per sample
    n_global: int         # the first n_global views of each sample are global
    step: int
    n_skipped: int        # records that failed to load and were replaced
    ids: list = field(default_factory=list)  # record id of each local sample

    def _map(self, fn) -> "Batch":
        return Batch(fn(self.packed), fn(self.labels), fn(self.is_3d), self.n_samples, self.n_views,
                     self.n_global, self.step, self.n_skipped, self.ids)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


_WARNED = set()


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item s is this rank's share of the batch of step s.

    The content of step s is a pure function of (seed, s), whatever the rank,
    the world size or where a run resumed:
    - the global batch of step s takes positions s*B .. s*B+B-1 of an endless
      stream of per-epoch permutations (seeded by (seed, epoch)) of each dataset;
    - rank r takes the contiguous share [r*B/world, (r+1)*B/world);
    - the views of a sample come from an RNG seeded by (seed, step, modality,
      position in the global batch);
    - a record that fails to load is replaced by the next index of the same
      permutation (a function of the position only), counted and warned once.
    """

    def __init__(self, ds_2d, ds_3d, *, batch_2d, batch_3d, steps, mode, n_global, n_local,
                 global_scale, local_scale, patch, seed, rank, world, photometric=False, gamma=0.0,
                 local_grid=0, zoom=0.0, paired_views=0, drr_size=XRAY_SIZE):
        if mode not in ("lejepa", "supervised"):
            raise ValueError(f"mode must be 'lejepa' or 'supervised', got {mode!r}")
        self.parts = []  # (modality code, dataset, global batch)
        for code, name, ds, b in ((0, "batch_2d", ds_2d, batch_2d), (1, "batch_3d", ds_3d, batch_3d)):
            if ds is None or not b:
                continue
            if b % world:
                raise ValueError(f"{name}={b} is not divisible by world={world}")
            if len(ds) == 0:
                raise ValueError(f"{ds.name}/{ds.split}: empty dataset")
            self.parts.append((code, ds, b))
        if not self.parts:
            raise ValueError("make_loader needs a 2D or a 3D dataset with a batch size > 0")
        self.steps, self.patch, self.seed, self.rank, self.world = steps, patch, seed, rank, world
        self.n_global, self.n_local = (1, 0) if mode == "supervised" else (n_global, n_local)
        self.global_scale, self.local_scale, self.photometric = global_scale, local_scale, photometric
        self.gamma, self.local_grid, self.zoom = gamma, local_grid, zoom
        if not 0 <= paired_views <= self.n_local:
            raise ValueError(f"paired_views={paired_views} must be in [0, n_local={self.n_local}]: paired views "
                             f"take the place of local views (none in supervised mode)")
        self.paired_views, self.drr_size = paired_views, drr_size
        self._perms = {}

    def __len__(self) -> int:
        return self.steps

    def _perm(self, code: int, n: int, epoch: int) -> np.ndarray:
        key = (code, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, code, epoch]).permutation(n)
        return self._perms[key]

    def _load(self, code: int, ds, step: int, batch: int, pos: int):
        """(record, its views, n_skipped) at position pos of the global batch of step.

        A record that fails (unreadable, non-finite, smaller than a patch) is
        replaced by the next index of the same permutation: a function of the
        position only, so every rank and every resume makes the same choice.
        """
        epoch, offset = divmod(step * batch + pos, len(ds))
        perm = self._perm(code, len(ds), epoch)
        for skipped in range(len(ds)):
            i = int(perm[(offset + skipped) % len(ds)])
            try:
                rec = ds[i]
                rng = np.random.default_rng([self.seed, step, code, pos])
                views = make_views(rec.image, rng, self.patch, self.n_global, self.n_local,
                                   self.global_scale, self.local_scale, local_grid=self.local_grid, zoom=self.zoom)
                if code == 1 and self.paired_views:
                    views = views[:len(views) - self.paired_views] + self._drr_views(rec, rng)
                if self.photometric:  # drawn after the crops: the crops are the same with or without
                    views = [photometric(v, rng) for v in views]
                if self.gamma:
                    views = [gamma_jitter(v, rng, self.gamma) for v in views]
                return rec, views, skipped
            except Exception as e:  # never crash mid-run on one bad file
                message = f"skipping {ds.name}/{ds.split}[{i}]: {e}"
                if message not in _WARNED:  # once per file and process
                    _WARNED.add(message)
                    warnings.warn(message)
        raise RuntimeError(f"{ds.name}/{ds.split}: no record could be loaded (all {len(ds)} failed)")

    def _drr_views(self, rec, rng) -> list:
        """--paired-views: crops of the CT's DRR at the global views' scale (a radiograph as a global view sees
        it), drawn after the CT's own crops, so those are the same with or without paired views. They sit in
        local slots: they predict the CT's global centroid and are not part of it (paper 2.2's L_pred)."""
        film = drr_record(rec, self.drr_size).image
        return make_views(film, rng, self.patch, self.paired_views, 0, self.global_scale, self.local_scale)

    def sample(self, step: int):
        """(ids, labels (n, 5), is_3d (n,), views per sample, n_skipped) of this rank at `step`."""
        ids, labels, is_3d, views, skipped = [], [], [], [], 0
        for code, ds, b in self.parts:
            share = b // self.world
            for pos in range(self.rank * share, (self.rank + 1) * share):
                rec, rec_views, k = self._load(code, ds, step, b, pos)
                views.append(rec_views)
                ids.append(rec.id)
                labels.append(rec.labels)
                is_3d.append(code == 1)
                skipped += k
        return ids, np.stack(labels).astype(np.float32), np.array(is_3d), views, skipped

    def __getitem__(self, step: int) -> Batch:
        ids, labels, is_3d, views, skipped = self.sample(step)
        n_views = self.n_global + self.n_local
        flat = [v[k] for k in range(n_views) for v in views]  # view-major
        return Batch(pack(flat, self.patch), torch.from_numpy(labels), torch.from_numpy(is_3d), len(ids),
                     n_views, self.n_global, step, skipped, ids)


def _as_is(batch):
    return batch


def make_loader(ds_2d, ds_3d, *, batch_2d, batch_3d, steps, start_step=0, mode="lejepa", n_global=2, n_local=8,
                global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), patch=14, alpha=128.0, seed=0, rank=0, world=1,
                workers=0, pin_memory=False, photometric=False, gamma=0.0, local_grid=0, zoom=0.0, paired_views=0,
                drr_size=XRAY_SIZE) -> torch.utils.data.DataLoader:
    """Batches of steps start_step .. steps-1 (paper 2.3/2.4: 192 2D + 64 3D; stage 1: 256 2D).

    Views are cropped and packed inside the worker processes; resume = start
    at start_step. alpha (RoPE scale) is applied by the model: pack.py stores
    grid indices, so it does not change the batches.
    """
    ds = StepDataset(ds_2d, ds_3d, batch_2d=batch_2d, batch_3d=batch_3d, steps=steps, mode=mode,
                     n_global=n_global, n_local=n_local, global_scale=global_scale, local_scale=local_scale,
                     patch=patch, seed=seed, rank=rank, world=world, photometric=photometric, gamma=gamma,
                     local_grid=local_grid, zoom=zoom, paired_views=paired_views, drr_size=drr_size)
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start_step, steps), num_workers=workers,
                                       collate_fn=_as_is, pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the training process: a scheduler signals the whole process group,
    and a worker killed by it would take the run down before train.py writes its checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
