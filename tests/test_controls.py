"""controls.py: the probes' controls pool the same tokens and pixels the model and the probe see."""
import json

import numpy as np
import torch

import controls
import data
import views
from model import SparseMedicalViT


def test_cell_pooled_tokens_average_back_to_the_models_own_embedding():
    """Cell means weighted by their token counts == the mean over the view == model.encode (the probe's feature)."""
    torch.manual_seed(0)
    model = SparseMedicalViT.from_preset("tiny", depth=2, attn="sdpa").eval()
    for name, size in (("phantom2d", 56), ("phantom3d", 42)):
        ds = data.open_dataset(name, "test", n=3, size=size)
        f = controls.pooled_tokens(model, ds)
        whole = [views.whole_view(ds[i], model.patch) for i in range(len(ds))]
        assert np.allclose(f["mean"], model.encode(whole).numpy(), atol=1e-5)
        for i, view in enumerate(whole):
            grid = np.array(view.shape[1:]) // model.patch
            grid = grid[grid > 1] if name == "phantom3d" else grid[1:]
            counts = np.ones(1)
            for g in grid:  # tokens per cell: the split of each patched axis into CELLS parts, as pooled_tokens cuts it
                per_axis = np.bincount(np.minimum(np.arange(g) * controls.CELLS // g, controls.CELLS - 1))
                counts = np.outer(counts, per_axis).ravel()
            cells = f["cells"][i].reshape(len(counts), -1)
            assert np.allclose((cells * counts[:, None]).sum(0) / counts.sum(), f["mean"][i], atol=1e-5)


def test_bag_of_patches_is_the_mean_patch_of_the_image():
    rec = data.open_dataset("phantom2d", "test", n=1, size=56)[0]
    view = views.whole_view(rec, 14)[0, 0].numpy()
    patches = [view[y:y + 14, x:x + 14] for y in range(0, view.shape[0], 14) for x in range(0, view.shape[1], 14)]
    mean = np.mean(patches, axis=0).reshape(7, 2, 7, 2).mean(axis=(1, 3))
    assert np.allclose(controls.bag_of_patches(rec, 14), mean.ravel(), atol=1e-6)


def test_shifts_scores_every_model_shift_and_probe_and_all_shifts_is_the_external_acquisition(tmp_path):
    """controls.py --shifts end to end on a tiny random checkpoint: a row per test set, shift setting, model
    and probe; with no shift the two probes are one (the internal training set), and the table has every cell."""
    torch.manual_seed(0)
    model = SparseMedicalViT(dim=32, depth=1, heads=2, attn="sdpa")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"format": 1, "model_config": model.config, "model": model.state_dict(),
                "args": {"stage": 3, "objective": "lejepa", "size_2d": 56, "size_3d": 28}}, ckpt)
    out = tmp_path / "out"
    assert controls.main(["--shifts", "--ckpt", f"T={ckpt}", "--random-init", "--n-train", "48", "--n-test", "32",
                          "--bootstrap", "20", "--out", str(out)]) == 0
    rows = json.loads((out / "shifts.json").read_text())["rows"]
    assert len(rows) == 2 * len(controls.SHIFT_SETTINGS) * 2 * 2  # test sets x shifts x models x probes
    by = {(r["test_set"], r["shift"], r["model"], r["probe"]): r["macro"] for r in rows}
    for test_set in ("MIMIC (phantom2d)", "CT-RATE (phantom3d)"):
        assert by[(test_set, "none", "T", "internal")] == by[(test_set, "none", "T", "same shift")]
        assert by[(test_set, "noise", "T", "internal")] != by[(test_set, "none", "T", "internal")]
    table = (out / "shifts.md").read_text()
    assert "| MIMIC (phantom2d) | resolution + noise + calibration |" in table and " nan" not in table
    assert controls.main(["--crops", "--ckpt", f"T={ckpt}", "--random-init", "--n-test", "64", "--out", str(out)]) == 0
    rows = json.loads((out / "crops.json").read_text())["rows"]  # 2 models x (2D local; 3D local, DRR crop)
    assert sorted((r["model"], r["views"]) for r in rows) == sorted(
        (m, v) for m in ("T", "Random init") for v in ("2D local crop", "3D local crop", "DRR crop"))
    assert all(1 <= r["median rank"] <= 64 and r["n"] > 0 for r in rows)


class _ByPosition(torch.nn.Module):
    """A stand-in model whose embedding of view i of a view-major batch is its sample's index (or a constant)."""
    patch = 14

    def __init__(self, n: int, constant: bool = False):
        super().__init__()
        self.n, self.constant = n, constant

    def forward(self, packed):
        index = torch.arange(packed.n_views) % self.n
        return torch.zeros(packed.n_views, 2) if self.constant else torch.stack([index, -index], 1).float()


def test_crop_ranks_find_each_views_own_centroid_and_count_ties_against_it():
    """A model that knows each view's sample ranks its own centroid first for every local view; a constant
    model ties with all 64 (rank 64, the worst); a CT sample's last two local slots are its DRR crops."""
    ds = data.open_dataset("phantom3d", "test", n=controls.CROP_BATCH, size=28)
    exact = controls.crop_ranks(_ByPosition(controls.CROP_BATCH), ds, 1, 0, 2, 56)
    assert sorted(exact) == ["3D local crop", "DRR crop"] and len(exact["DRR crop"]) == 2 * controls.CROP_BATCH
    assert len(exact["3D local crop"]) == 6 * controls.CROP_BATCH and all((r == 1).all() for r in exact.values())
    flat = controls.crop_ranks(_ByPosition(controls.CROP_BATCH, constant=True), ds, 1, 0, 2, 56)
    assert all((r == controls.CROP_BATCH).all() for r in flat.values())
    radiographs = controls.crop_ranks(_ByPosition(controls.CROP_BATCH), data.open_dataset(
        "phantom2d", "test", n=controls.CROP_BATCH, size=56), 1, 0, 2, 56)
    assert list(radiographs) == ["2D local crop"] and len(radiographs["2D local crop"]) == 8 * controls.CROP_BATCH


def test_phantom_draws_are_the_rendered_patients_own():
    """--nuisance reads each sample's draws from its own rng: the z extent and the labels it returns are those of
    the image the dataset renders (a CT has round(size * half z) slices; a film's width is round(size / half z))."""
    for name, size in (("phantom3d", 40), ("phantom2d", 48)):
        ds = data.open_dataset(name, "test", n=6, size=size, seed=3)
        t, y = controls.phantom_draws(name, "test", 6, seed=3)
        z = t[:, controls.NUISANCES.index("z extent")]
        for i in range(6):
            rec = ds[i]
            assert np.array_equal(rec.labels, y[i])
            shape = rec.image.shape
            assert (shape[0] == round(size * z[i])) if name == "phantom3d" else (shape[-1] == round(size / z[i]))


def test_variance_share_and_decodability_separate_what_the_embedding_follows():
    """An embedding built from one draw (big) and one label (small) plus noise: the variance share says which
    dominates, the cross-validated R^2 says both are readable, and a draw not in it reads near zero."""
    rng = np.random.default_rng(0)
    t, y = rng.standard_normal((400, 2)), (rng.random((400, 1)) > 0.5).astype(float)
    x = np.column_stack([3 * t[:, 0], y[:, 0], 0.1 * rng.standard_normal((400, 6))])
    x = x @ np.linalg.qr(rng.standard_normal((8, 8)))[0]  # a rotation keeps the variance shares: 9, 0.25, 0.06
    assert controls.explained(x, t) > 0.9 > 0.1 > controls.explained(x, y) > 0.01
    r2 = controls.decodable(x, np.column_stack([t, y]), seed=0)
    assert r2[0] > 0.95 and r2[2] > 0.9 and abs(r2[1]) < 0.05
