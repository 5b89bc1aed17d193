"""LeJEPA objective (paper 2.2): prediction loss + SIGReg, DDP-aware, torch only.

    loss = (1 - lambd) * L_pred + lambd * L_SIGReg            (paper 2.2, lambd = 0.025)

L_pred pulls every view of a sample towards the centroid of its global views;
SIGReg (Balestriero & LeCun, 2025) keeps the embeddings close to an isotropic
Gaussian, which is what prevents collapse. This file imports nothing but torch
and can be copied alone into another project.

Under torch.distributed every rank must call these functions with the same
number of samples (equal per-rank batches, as DDP with drop_last gives). The
loss each rank returns back-propagates world_size times the gradient of the
global full-batch loss w.r.t. that rank's inputs; DDP averages gradients over
ranks, so the update is exactly the single-process full-batch update, and the
balance between the two terms (what lambd means) is the same at every world size.

What lambd means depends on the batch. SIGReg is N times a mean over the batch, so
each sample's gradient from it does not shrink with N and the batch's total grows as
N, while the prediction loss is a plain mean: the two terms trade off as
lambd * N / (1 - lambd). The paper's lambd = 0.025 at 256 samples per step is a ratio
of 6.56; at the CPU demo's 32 samples the same lambd is 8x weaker, and there the
embedding collapses onto the one feature that costs no prediction loss (measured:
results/collapse.md). balanced_lambd() keeps the paper's ratio at any batch.
"""

import torch
import torch.distributed as dist

PAPER_LAMBD, PAPER_BATCH = 0.025, 256  # paper 2.4: lambda = 0.025 at 256 samples per step (192 2D + 64 3D)


def _check_shape(z, what):
    if z.ndim != 3:
        raise ValueError(f"{what}: expected z of shape (V, N, K), got {tuple(z.shape)}")
    if z.shape[0] == 0 or z.shape[2] == 0:
        raise ValueError(f"{what}: z of shape {tuple(z.shape)} has no views (V = 0) or no dimensions (K = 0)")


def sigreg(z, step, num_slices=256, knots=17, t_max=3.0, micro_batches=1, groups=None, num_groups=1):
    """Sliced Epps-Pulley statistic of z (N, K), or (V, N, K) averaged over views.

    For unit directions a (K,) and projections x = z @ a, with the empirical
    characteristic function phi_N(t) = mean_n exp(i t x_n) and phi(t) = exp(-t^2/2):

        EP(a) = N * integral_{-t_max}^{t_max} |phi_N(t) - phi(t)|^2 exp(-t^2/2) dt
        SIGReg = mean over num_slices directions of EP(a)

    The integrand is even in t, so it is integrated on [0, t_max] with `knots`
    trapezoid knots and doubled. Directions come from a generator seeded with
    `step`, so every rank draws the same ones. Under torch.distributed the
    cos/sin sums and the sample counts are summed over ranks, so N is the
    global sample count. With gradient accumulation (micro_batches calls per
    optimizer step) N is the step's sample count, not this call's: the
    N-scaled statistic then weighs as much in every call as in one full-batch
    call, so lambd means the same whatever the accumulation (the ECF is still
    this call's estimate). Computed in float32 whatever the input dtype or autocast state.

    groups (N,) ids in [0, num_groups), beyond the paper: the statistic of each
    group apart, summed, SIGReg = sum_g mean_a EP_g(a), where EP_g takes phi_N
    and N from group g's N_g samples alone. Each sample's gradient keeps the
    scale it has in one whole-batch statistic, so lambd means the same. With
    the modality as the group, each modality must look Gaussian on its own,
    not only their mixture (paper 2.2 regularises the mixed batch). A group
    with fewer than 2 samples in the whole step adds nothing. None: one group.
    """
    if z.ndim == 2:
        z = z.unsqueeze(0)
    elif z.ndim != 3:
        raise ValueError(f"sigreg: expected z of shape (N, K) or (V, N, K), got {tuple(z.shape)}")
    _check_shape(z, "sigreg")
    if knots < 2:
        raise ValueError(f"sigreg: trapezoid quadrature needs knots >= 2, got {knots}")
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if z.shape[1] * world < 2:
        raise ValueError(f"sigreg: needs at least 2 samples, got N={z.shape[1] * world}: the statistic is meaningless")
    if groups is not None and groups.shape != (z.shape[1],):
        raise ValueError(f"sigreg: groups must hold one id per sample, shape ({z.shape[1]},), got {tuple(groups.shape)}")

    with torch.autocast(device_type=z.device.type, enabled=False):  # bf16 cos/sin would be too coarse
        z = z.float()
        if groups is None:  # the paper's statistic: one group, its count known without a sync
            counts = torch.full((1,), float(z.shape[1] * world), device=z.device)
        else:
            member = torch.nn.functional.one_hot(groups.long(), num_groups).float()  # (N, G)
            counts = member.sum(0)  # (G,) this rank's samples of each group, then the step's
            if distributed:
                dist.all_reduce(counts)
        gen = torch.Generator(device=z.device).manual_seed(step)  # seeded by step, never by rank
        a = torch.randn(z.shape[-1], num_slices, generator=gen, device=z.device)
        a = a / a.norm(dim=0)  # (K, S) unit directions
        t = torch.linspace(0, t_max, knots, device=z.device)  # (T,)
        phi = torch.exp(-t.square() / 2)  # Gaussian characteristic function, also the weight window
        dt = t_max / (knots - 1)
        weights = torch.full((knots,), 2 * dt, device=z.device)  # trapezoid dt (dt/2 at ends), x2 for t < 0
        weights[[0, -1]] = dt
        weights = weights * phi

        xt = (z @ a).unsqueeze(-1) * t  # (V, N, S, T)
        if groups is None:  # cos/sin sums over the samples, (2, V, 1, S, T)
            sums = torch.stack([xt.cos().sum(1, keepdim=True), xt.sin().sum(1, keepdim=True)])
        else:  # over each group's samples, (2, V, G, S, T)
            sums = torch.stack([torch.einsum("vnst,ng->vgst", f(xt), member) for f in (torch.cos, torch.sin)])
        if distributed:
            # autograd-aware (its backward sums the gradients over ranks).
            # Deprecated in torch 2.13 and not allowed inside torch.compile, but public
            # and differentiable on every torch version: keep the loss outside compile.
            from torch.distributed.nn.functional import all_reduce

            sums = all_reduce(sums)
        ecf = sums / counts.clamp_min(1)[:, None, None]  # (2, V, G, S, T): Re, Im of phi_N per group
        err = (ecf[0] - phi).square() + ecf[1].square()  # |phi_N(t) - phi(t)|^2, (V, G, S, T)
        stat = (err @ weights).mean((0, 2))  # (G,) mean over views and directions
        n = counts * micro_batches  # samples of the whole optimizer step (equal per-rank batches)
        return torch.where(counts >= 2, stat * n, 0.0).sum()


def prediction_loss(z, n_global):
    """Prediction loss (paper 2.2) for z (V, N, K) whose first n_global views are global.

        mu = mean_{v < n_global} z_v,   L_pred = mean over v, n, k of (z - mu)^2

    An element-wise mean as in the official LeJEPA code: the paper's squared
    norm is K times larger, which would change what lambd means.
    """
    _check_shape(z, "prediction_loss")
    if not 1 <= n_global <= z.shape[0]:
        raise ValueError(f"prediction_loss: n_global={n_global} must be in [1, V={z.shape[0]}]")
    z = z.float()
    centroid = z[:n_global].mean(0)  # (N, K), the target every view predicts
    return (z - centroid).square().mean()


def lejepa_loss(z, n_global, lambd=0.025, step=0, micro_batches=1, num_slices=256, groups=None, num_groups=1):
    """LeJEPA loss (paper 2.2) on projector outputs z (V, N, K) of every view.

    Returns (loss, parts) with loss = (1 - lambd) * L_pred + lambd * SIGReg and
    parts = {"pred": ..., "sigreg": ...}, detached float32 scalar tensors
    (no host sync; call .item() when logging). micro_batches: calls per
    optimizer step under gradient accumulation (see sigreg). n_global = V makes
    the target the centroid of all views, as the official minimal example.
    groups, num_groups: SIGReg per group (see sigreg; beyond the paper); the
    loss then uses that sum and parts also hold "sigreg_groups", while
    parts["sigreg"] stays the whole-batch statistic, comparable across runs.
    """
    if not 0.0 <= lambd <= 1.0:
        raise ValueError(f"lejepa_loss: lambd={lambd} must be in [0, 1]")
    pred = prediction_loss(z, n_global)
    reg = sigreg(z, step, num_slices=num_slices, micro_batches=micro_batches, groups=groups, num_groups=num_groups)
    loss = (1 - lambd) * pred + lambd * reg
    if groups is None:
        return loss, {"pred": pred.detach(), "sigreg": reg.detach()}
    with torch.no_grad():
        whole = sigreg(z, step, num_slices=num_slices, micro_batches=micro_batches)
    return loss, {"pred": pred.detach(), "sigreg": whole, "sigreg_groups": reg.detach()}


def sigreg_weight(lambd, n_samples):
    """How much SIGReg weighs against the prediction loss at n_samples per step: lambd * N / (1 - lambd)
    (module docstring). 6.56 for the paper (0.025 at 256)."""
    return lambd * n_samples / max(1 - lambd, 1e-12)


def balanced_lambd(n_samples, lambd=PAPER_LAMBD, at=PAPER_BATCH):
    """The SIGReg weight that balances the two terms at n_samples per step as lambd does at `at`.

    Solving sigreg_weight(x, n_samples) = r = sigreg_weight(lambd, at) gives r / (r + n_samples):
    0.025 at 256 (the paper), 0.17 at 32.
    """
    if n_samples < 1:
        raise ValueError(f"balanced_lambd: n_samples={n_samples} must be >= 1")
    r = sigreg_weight(lambd, at)
    return r / (r + n_samples)


@torch.no_grad()
def effective_rank(z):
    """Effective rank of z (N, K): exp of the entropy of the normalized squared singular values
    of the centred rows (Roy & Vetterli, 2007). 1 when every sample lies on one line (collapse),
    at most min(N - 1, K); an isotropic Gaussian batch scores close to that bound."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"effective_rank: expected z of shape (N >= 2, K), got {tuple(z.shape)}")
    s = torch.linalg.svdvals((z - z.mean(0)).double())
    p = s.square() / s.square().sum().clamp_min(1e-300)
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).float()
