"""Tests for lejepa.py: SIGReg and the LeJEPA loss (paper 2.2)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from lejepa import PAPER_BATCH, PAPER_LAMBD, balanced_lambd, effective_rank, lejepa_loss, prediction_loss, sigreg


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a busy shared CPU, two OpenMP threads are ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def directions(k, num_slices, step):
    """The directions sigreg draws, rebuilt from the documented recipe."""
    a = torch.randn(k, num_slices, generator=torch.Generator().manual_seed(step))
    return a / a.norm(dim=0)


def epps_pulley_fine_grid(z, step, num_slices=256, t_max=3.0, points=2001):
    """Independent float64 evaluation of N * int_{-t_max}^{t_max} |phi_N - phi|^2 exp(-t^2/2) dt."""
    x = z.double().numpy() @ directions(z.shape[-1], num_slices, step).double().numpy()  # (N, S)
    t = np.linspace(-t_max, t_max, points)  # both half-lines, no symmetry trick
    xt = x[..., None] * t  # (N, S, T)
    ecf = np.exp(1j * xt).mean(0)  # (S, T)
    integrand = np.abs(ecf - np.exp(-(t**2) / 2)) ** 2 * np.exp(-(t**2) / 2)
    return (np.trapezoid(integrand, t, axis=-1) * z.shape[0]).mean()


def test_sigreg_near_zero_for_gaussian_large_for_collapsed_scaled_shifted():
    g = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0))
    gauss = sigreg(g, step=0).item()
    assert gauss < 3.0  # N * E|phi_N - phi|^2 integrates to about 1 for Gaussian samples
    for name, z in {"collapsed": torch.zeros_like(g), "scaled": 3 * g, "shifted": g + 2, "shrunk": 0.5 * g}.items():
        assert sigreg(z, step=0).item() > 100 * gauss, name


def test_sigreg_is_n_scaled():
    gen = torch.Generator().manual_seed(1)
    small, large = torch.randn(256, 16, generator=gen), torch.randn(4096, 16, generator=gen)
    # Gaussian: the N-scaled statistic stays of the same order as N grows 16x
    assert 0.5 < sigreg(large, 0).item() / sigreg(small, 0).item() < 2.0
    # non-Gaussian: it grows with N (about linearly)
    assert sigreg(large + 1, 0).item() / sigreg(small + 1, 0).item() > 10.0


def test_accumulated_micro_batches_weigh_sigreg_as_the_full_batch():
    """--accum K: K calls on N/K samples each must weigh SIGReg as one call on N does (lambd keeps its meaning)."""
    z = torch.rand(256, 16, generator=torch.Generator().manual_seed(7)) * 2  # far from Gaussian
    full = sigreg(z, step=3).item()
    micro = [sigreg(part, step=3, micro_batches=4).item() for part in z.chunk(4)]
    assert np.mean(micro) == pytest.approx(full, rel=0.05)
    unscaled = np.mean([sigreg(part, step=3).item() for part in z.chunk(4)])
    assert unscaled == pytest.approx(full / 4, rel=0.05)  # what each micro-batch weighed before: a quarter
    loss, parts = lejepa_loss(z.view(2, 128, 16), n_global=1, step=3, micro_batches=2)
    assert parts["sigreg"].item() == pytest.approx(2 * sigreg(z.view(2, 128, 16), step=3).item(), rel=1e-6)


def test_sigreg_equals_fine_grid_quadrature():
    gen = torch.Generator().manual_seed(2)
    for z in [torch.randn(64, 8, generator=gen), 1.5 * torch.randn(64, 8, generator=gen) + 0.3, 4 * torch.rand(64, 8, generator=gen)]:
        reference = epps_pulley_fine_grid(z, step=3, num_slices=64)
        # the 17-knot half-line trapezoid of the paper's setting is accurate ...
        assert sigreg(z, step=3, num_slices=64).item() == pytest.approx(reference, rel=2e-3)
        # ... and converges to the integral itself
        assert sigreg(z, step=3, num_slices=64, knots=1001).item() == pytest.approx(reference, rel=2e-5)


def test_sigreg_averages_views_and_directions_depend_only_on_step():
    z = torch.randn(3, 32, 4, generator=torch.Generator().manual_seed(4))
    per_view = torch.stack([sigreg(v, step=5) for v in z])
    assert sigreg(z, step=5).item() == pytest.approx(per_view.mean().item(), rel=1e-6)
    assert sigreg(z, step=5).item() == sigreg(z, step=5).item()
    assert sigreg(z, step=5).item() != sigreg(z, step=6).item()


def test_sigreg_per_group_is_the_sum_of_each_groups_statistic_alone():
    """groups: each group's samples are scored apart (with their own N) and summed; value and gradient."""
    gen = torch.Generator().manual_seed(12)
    z = torch.cat([torch.randn(2, 20, 8, generator=gen), 3 * torch.randn(2, 12, 8, generator=gen) + 1], dim=1)
    groups = torch.tensor([0, 1] * 4 + [0] * 12 + [1] * 12)[torch.randperm(32, generator=gen)]  # 16 + 16, mixed order
    grouped = z.clone().requires_grad_(True)
    sigreg(grouped, step=4, groups=groups, num_groups=3).backward()  # group 2 is empty: adds nothing
    apart = z.clone().requires_grad_(True)
    sum(sigreg(apart[:, groups == g], step=4) for g in (0, 1)).backward()
    torch.testing.assert_close(grouped.grad, apart.grad, rtol=1e-4, atol=1e-7)
    assert sigreg(z, 4, groups=groups, num_groups=3).item() == pytest.approx(
        sum(sigreg(z[:, groups == g], 4).item() for g in (0, 1)), rel=1e-5)
    # one group is the paper's statistic; a group of one sample adds nothing
    zeros = torch.zeros(32, dtype=torch.long)
    assert sigreg(z, 4, groups=zeros).item() == pytest.approx(sigreg(z, 4).item(), rel=1e-6)
    lone = torch.tensor([0] * 31 + [1])
    assert sigreg(z, 4, groups=lone, num_groups=2).item() == pytest.approx(sigreg(z[:, :31], 4).item(), rel=1e-5)
    # a Gaussian batch split by the sign of one coordinate: the mixture passes, each half (half-normal) fails
    g = torch.randn(1024, 8, generator=gen)
    halves = (g[:, 0] > 0).long()
    assert sigreg(g, 0, groups=halves, num_groups=2).item() > 20 * sigreg(g, 0).item()
    with pytest.raises(ValueError, match="one id per sample"):
        sigreg(z, 4, groups=zeros[:5])


def test_lejepa_loss_per_group_logs_the_whole_batch_statistic_beside():
    z = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(13))
    ids = torch.tensor([0] * 12 + [1] * 4)
    loss, parts = lejepa_loss(z, 2, lambd=0.2, step=2, groups=ids, num_groups=2)
    assert parts["sigreg"].item() == pytest.approx(sigreg(z, 2).item(), rel=1e-6)
    assert parts["sigreg_groups"].item() == pytest.approx(sigreg(z, 2, groups=ids, num_groups=2).item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.8 * parts["pred"].item() + 0.2 * parts["sigreg_groups"].item(), rel=1e-6)


def test_sigreg_bf16_input_and_autocast_give_float32_value():
    z = torch.randn(2, 128, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    ref = sigreg(z.float(), step=7)
    out = sigreg(z, step=7)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run z @ a in bf16 if not disabled
        auto = sigreg(z.float(), step=7)
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(ref.item(), rel=1e-6)


def test_prediction_loss_is_elementwise_mean_to_global_centroid():
    z = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(6))
    centroid = (z[0] + z[1]) / 2
    expected = sum(((z[v] - centroid) ** 2).sum() for v in range(5)) / (5 * 6 * 3)
    assert prediction_loss(z, 2).item() == pytest.approx(expected.item(), rel=1e-6)
    assert prediction_loss(z[:1].expand(4, 6, 3), 1).item() == 0.0  # identical views: nothing to predict


def test_lejepa_loss_combines_parts_and_gradients_are_finite():
    z = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    loss, parts = lejepa_loss(z, n_global=2, lambd=0.1, step=3)
    assert loss.item() == pytest.approx(0.9 * parts["pred"].item() + 0.1 * parts["sigreg"].item(), rel=1e-6)
    assert parts["sigreg"].item() == pytest.approx(sigreg(z, 3).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    collapsed = torch.zeros(4, 16, 8, requires_grad=True)  # cos/sin at 0 must not give NaN
    lejepa_loss(collapsed, n_global=2)[0].backward()
    assert torch.isfinite(collapsed.grad).all()


def test_errors_for_shapes_that_do_not_fit():
    z = torch.randn(4, 8, 3)
    cases = [
        (lambda: prediction_loss(z, 5), "n_global"),
        (lambda: prediction_loss(z, 0), "n_global"),
        (lambda: prediction_loss(z[0], 1), "shape"),
        (lambda: sigreg(torch.randn(8, 0), 0), "K = 0"),
        (lambda: sigreg(torch.randn(1, 3), 0), "at least 2 samples"),
        (lambda: sigreg(torch.randn(8), 0), "shape"),
        (lambda: sigreg(torch.randn(2, 2, 8, 3), 0), "shape"),
        (lambda: lejepa_loss(z, 2, lambd=1.5), "lambd"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()



def _batch():
    z = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(8))  # (V, N, K)
    return z, 2  # z, n_global


def _groups():
    """Uneven per rank: rank 0 holds 6 of group 0 and 2 of group 1, rank 1 holds 3 and 5."""
    return torch.tensor([0, 0, 1, 0, 0, 0, 1, 0] + [1, 1, 0, 1, 0, 1, 0, 1])


def _rank_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    z, n_global = _batch()
    n = z.shape[1] // world
    local = z[:, rank * n : (rank + 1) * n].clone().requires_grad_(True)
    loss, parts = lejepa_loss(local, n_global, step=11)
    loss.backward()
    local_sig = local.detach().clone().requires_grad_(True)
    sigreg(local_sig, step=11).backward()
    local_grouped = local.detach().clone().requires_grad_(True)
    grouped = sigreg(local_grouped, step=11, groups=_groups()[rank * n : (rank + 1) * n], num_groups=2)
    grouped.backward()
    result = dict(loss=loss.detach(), sigreg=parts["sigreg"], pred=parts["pred"], grad=local.grad, sigreg_grad=local_sig.grad,
                  grouped=grouped.detach(), grouped_grad=local_grouped.grad)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    # torch 2.13's gloo threads abort at interpreter teardown now and then
    # ("terminate called without an active exception"): skip it, the results are saved
    os._exit(0)


def test_two_ranks_with_half_batch_equal_one_process_with_full_batch(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    z, n_global = _batch()
    full = z.clone().requires_grad_(True)
    loss, parts = lejepa_loss(full, n_global, step=11)
    loss.backward()
    full_sig = z.clone().requires_grad_(True)
    sigreg(full_sig, step=11).backward()

    for r in ranks:  # SIGReg is global: every rank sees the full-batch value
        torch.testing.assert_close(r["sigreg"], parts["sigreg"], rtol=1e-5, atol=1e-6)
    # prediction loss is per sample, so it stays local: the mean over ranks is the full-batch value
    torch.testing.assert_close(torch.stack([r["pred"] for r in ranks]).mean(), parts["pred"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach(), rtol=1e-5, atol=1e-7)
    # autograd all_reduce sums gradients in backward, so each rank holds world x the full-batch
    # gradient of its own samples, for both terms alike; DDP's average over ranks divides by
    # world, which makes the update exactly the full-batch one and keeps lambd's meaning
    grad = torch.cat([r["grad"] for r in ranks], dim=1) / world
    sigreg_grad = torch.cat([r["sigreg_grad"] for r in ranks], dim=1) / world
    torch.testing.assert_close(sigreg_grad, full_sig.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, full.grad, rtol=1e-4, atol=1e-6)
    # SIGReg per group: counts and sums reduced over ranks, so uneven splits still give the full-batch statistic
    full_grouped = z.clone().requires_grad_(True)
    value = sigreg(full_grouped, step=11, groups=_groups(), num_groups=2)
    value.backward()
    for r in ranks:
        torch.testing.assert_close(r["grouped"], value.detach(), rtol=1e-5, atol=1e-6)
    grouped_grad = torch.cat([r["grouped_grad"] for r in ranks], dim=1) / world
    torch.testing.assert_close(grouped_grad, full_grouped.grad, rtol=1e-4, atol=1e-6)


def _train_encoder(lambd, steps=200):
    """A tiny MLP on noisy views of random inputs; returns embeddings of fresh inputs."""
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    encoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for step in range(steps):
        x = torch.randn(64, 16, generator=gen)
        views = x + 0.3 * torch.randn(3, 64, 16, generator=gen)  # (V, N, D), 2 global + 1 local
        loss, _ = lejepa_loss(encoder(views), n_global=2, lambd=lambd, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return encoder(torch.randn(1024, 16, generator=gen))


def test_sigreg_prevents_collapse():
    collapsed = _train_encoder(lambd=0.0)  # prediction term alone
    spread = _train_encoder(lambd=0.025)  # LeJEPA
    assert collapsed.var(0).mean() < 1e-4
    eigenvalues = torch.linalg.eigvalsh(torch.cov(spread.T))
    assert eigenvalues.min() > 0.3 and eigenvalues.max() < 2.0  # close to isotropic, unit scale
    assert sigreg(spread, step=0) < 0.1 * sigreg(collapsed, step=0)


def test_balanced_lambda_is_the_paper_lambda_at_its_batch_and_keeps_its_ratio_elsewhere():
    assert balanced_lambd(PAPER_BATCH) == pytest.approx(PAPER_LAMBD)
    ratio = lambda lam, n: lam * n / (1 - lam)  # noqa: E731  how SIGReg weighs against the prediction loss
    for n in (2, 12, 32, 1024):
        assert ratio(balanced_lambd(n), n) == pytest.approx(ratio(PAPER_LAMBD, PAPER_BATCH))
    assert balanced_lambd(32) == pytest.approx(0.170, abs=1e-3)  # the CPU demo's 24 + 8 samples


def test_sigreg_gradient_grows_with_n_while_the_prediction_gradient_does_not():
    """Why lambda must follow the batch: the batch's total gradient of SIGReg is ~N, of L_pred ~1."""
    def grads(n):
        z = (torch.randn(3, n, 16, generator=torch.Generator().manual_seed(n)) * 0.3).requires_grad_()
        g_pred = torch.autograd.grad(prediction_loss(z, 2), z)[0].norm(dim=-1).sum()
        g_sig = torch.autograd.grad(sigreg(z, step=0), z)[0].norm(dim=-1).sum()
        return g_pred.item(), g_sig.item()
    (p1, s1), (p2, s2) = grads(64), grads(512)
    assert s2 / s1 == pytest.approx(8, rel=0.25) and p2 / p1 == pytest.approx(1, rel=0.25)


def test_effective_rank_is_one_when_collapsed_and_near_full_for_a_gaussian():
    gen = torch.Generator().manual_seed(0)
    line = torch.randn(64, 1, generator=gen) * torch.randn(1, 32, generator=gen) + 5.0  # one direction, shifted
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.zeros(8, 4)) == pytest.approx(1.0)  # a point: no spread at all
    assert effective_rank(torch.randn(4096, 16, generator=gen)) > 15.5  # isotropic: all 16 directions
    scaled = torch.randn(4096, 16, generator=gen) * torch.tensor([10.0] + [1.0] * 15)
    assert 1.0 < effective_rank(scaled) < 8.0  # one dominant direction drags it down
    with pytest.raises(ValueError, match="N >= 2"):
        effective_rank(torch.zeros(1, 4))
