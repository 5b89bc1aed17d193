"""controls.py: the probes' controls pool the same tokens and pixels the model and the probe see."""
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
