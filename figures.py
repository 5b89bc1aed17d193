"""Figures: the paper's Figure 2 (section 3.4) and the training curves.

    python probe.py --ckpt ...        draws Figure 2a and 2b beside the tables (probe.run calls this module)
    python probe.py curves RUN...     draws the training curves of train.py runs

- Figure 2a (paper 3.4): plot_figure_2a draws fig2a.png from the report of probe.figure_2a. The numbers
  stay in probe.py because they are the probe's own: logistic regressions with C chosen on held-out patients
  (probe.fit_label) on the top principal components, and their AUROC; fig2a.md/.json are written there.
- Figure 2b (paper 3.4): DINO-style PCA maps of the patch tokens of a few 2D images and CT volumes, one PCA
  over both modalities (fig2b_{2d,3d}_{k}.png, fig2b.json).
- Training curves: the losses and embedding-health figures of metrics.jsonl, one panel each (curves.png).

Imports, and why: numpy; pillow (Figure 2b's PNG when matplotlib is absent); torch, pack and model (Figure 2b
runs the frozen backbone on its examples: it needs patch tokens, which the probe's features do not keep);
scikit-learn's PCA (Figure 2b's colours); data (LABELS, atomic_write); views (whole_view: each sample as the
probe sees it). matplotlib is imported lazily and optional: without it every figure has a fallback (a Pillow
PNG, or the Markdown and JSON it plots). Nothing here imports probe.py: probe.py imports this module.
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from sklearn.decomposition import PCA

import data
from model import SparseMedicalViT
from pack import pack
from views import whole_view

# ---------------------------------------------------------------- drawing with matplotlib (optional)

def matplotlib_figure(**kwargs):
    """A matplotlib Figure (no pyplot: no global state, no display), or None without matplotlib: it is an
    optional dependency, and every figure has a fallback (a Pillow PNG, or the Markdown and JSON it plots)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(**kwargs)


def save_figure(fig, path: str):
    data.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


# ---------------------------------------------------------------- Figure 2a (paper 3.4)

def plot_figure_2a(report: dict, path: str, label: str = "Cardiomegaly") -> bool:
    """Fig. 2a as the paper draws it (paper 3.4): AUROC of the fits on 2D, 3D and joint PCs on each modality's
    test set, the |coefficient| of each PC in each fit, and the variance each PC explains."""
    fig = matplotlib_figure(figsize=(16, 5), layout="constrained")
    if fig is None:
        return False
    fits, tests, n = report["labels"][label], report["test_sets"], report["n_components"]
    ax_auc, ax_coef, ax_var = fig.subplots(1, 3, width_ratios=[1.1, 1.6, 1])
    x = np.arange(len(fits))
    for k, (t, title) in enumerate(tests.items()):
        aurocs = np.array([f["auroc"][t] for f in fits.values()], dtype=float)  # None (no probe) -> NaN
        cis = np.array([f.get("ci", {}).get(t, [None, None]) for f in fits.values()], dtype=float)  # (fits, 2)
        err = np.nan_to_num(np.abs(np.stack([aurocs - cis[:, 0], cis[:, 1] - aurocs])))
        bars = ax_auc.bar(x + (k - (len(tests) - 1) / 2) * 0.38, np.nan_to_num(aurocs), 0.38, yerr=err, capsize=3,
                          label=f"tested on {title}")
        ax_auc.bar_label(bars, ["n/a" if np.isnan(a) else f"{a:.2f}" for a in aurocs],  # n/a: no probe (one class)
                         fontsize=10)
    ax_auc.axhline(0.5, color="gray", lw=1, ls="--")
    ax_auc.set_xticks(x, [f"fit on {f}" for f in fits])
    ax_auc.set(ylim=(0, 1.18), ylabel="AUROC", title=f"(i) {label}: AUROC of each fit, 95% CI (dashed: chance)")
    ax_auc.legend(loc="upper left", fontsize=9)
    width = 0.8 / len(fits)
    for k, (fit, f) in enumerate(fits.items()):
        ax_coef.bar(np.arange(n) + (k - (len(fits) - 1) / 2) * width, np.abs(f["coef"]), width, label=f"fit on {fit}")
    ax_coef.set_xticks(range(n), [f"PC{i + 1}" for i in range(n)])
    ax_coef.set(ylabel="|coefficient| (standardized PCs)", title="(ii) which components each fit relies on")
    ax_coef.legend(fontsize=9)
    ax_var.bar(range(n), report["explained_variance_ratio"], color="gray")
    ax_var.set_xticks(range(n), [f"PC{i + 1}" for i in range(n)])
    ax_var.set(yscale="log", ylabel="explained variance ratio", title="(iii) variance of each component")
    for ax in (ax_auc, ax_coef, ax_var):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=9)
    fig.suptitle(f"Figure 2a: logistic regression on the top {n} principal components of the joint 2D + 3D "
                 "training embeddings", fontsize=14)
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------- Figure 2b (paper 3.4)

def pick_examples(ds, count: int) -> list:
    """Indices of up to `count` samples, Cardiomegaly-positive first (the finding Fig. 2b highlights)."""
    positive = ds.labels[:, data.LABELS.index("Cardiomegaly")] == 1  # labels only: no image is read
    return np.argsort(~positive, kind="stable")[:count].tolist()


def to_gray(img: np.ndarray) -> np.ndarray:
    """[-1, 1] image (H, W) -> uint8 RGB (H, W, 3)."""
    g = np.clip((img + 1) * 127.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def stretch(pcs: np.ndarray, lo: float = 2, hi: float = 98) -> np.ndarray:
    """PC values (..., 3) -> RGB in [0, 1], each channel stretched to its lo-hi percentile range over the map:
    the colours use the whole range however little the map's tokens spread."""
    a, b = np.percentile(pcs.reshape(-1, 3), [lo, hi], axis=0)
    return np.clip((pcs - a) / np.maximum(b - a, 1e-12), 0, 1)


CARD_STATE = {1.0: "positive", 0.0: "negative"}


# Where the patient is on each panel (data.py's orientation): a radiograph as a frontal film is read, an axial CT
# slice as radiologists display it; the patient's right is on the image's left in both
MARKS = {"2d": {"top": "S", "bottom": "I", "left": "R", "right": "L"},
         "3d": {"top": "A", "bottom": "P", "left": "R", "right": "L"}}
MARK_AT = {"top": (0.5, 0.97, "center", "top"), "bottom": (0.5, 0.03, "center", "bottom"),
           "left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center")}


def orientation_marks(ax, modality: str):
    for side, letter in MARKS[modality].items():
        x, y, ha, va = MARK_AT[side]
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=13, weight="bold")


def draw_map(gray: np.ndarray, fmap: np.ndarray, entry: dict, name: str, patch: int, pca_over: str = "2D and 3D"):
    """Fig. 2b, one sample: input | PCA map | overlay, titled, with the patient's orientation (R/L, S/I or A/P)
    on every panel and the CT window and slice named; None without matplotlib."""
    fig = matplotlib_figure(figsize=(13, 5.4), layout="constrained")
    if fig is None:
        return None
    modality = "3d" if "slice" in entry else "2d"
    where = (f"CT, axial slice {entry['slice']['index']} of {entry['slice']['of']} (from the top),\n"
             f"window L={data.WINDOW_LEVEL:.0f} W={data.WINDOW_WIDTH:.0f} HU (paper 2.4)" if modality == "3d"
             else "radiograph (frontal)")
    axes = fig.subplots(1, 3)
    axes[0].imshow(gray, cmap="gray", vmin=-1, vmax=1)
    axes[1].imshow(fmap, interpolation="nearest")
    axes[2].imshow(gray, cmap="gray", vmin=-1, vmax=1)
    axes[2].imshow(fmap, alpha=0.45, interpolation="nearest")
    for ax, title in zip(axes, (f"input: {where}", "PCA map of the patch features", "overlay")):
        ax.set_title(title, fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
        orientation_marks(ax, modality)
    model = f"{name}, " if name else ""
    fig.suptitle(f"Figure 2b: PCA feature map ({model}{entry['dataset']} {entry['split']} #{entry['index']}, "
                 f"id {entry['id']}, Cardiomegaly {entry['cardiomegaly']})", fontsize=15)
    fig.supxlabel(f"colour key: red = PC1, green = PC2, blue = PC3 of the patch features (one PCA over the {pca_over} "
                  "examples),\neach stretched to its 2-98th percentile in this map; one colour per "
                  f"{patch}-pixel patch (nearest-neighbour upsampling)", fontsize=11)
    return fig


@torch.inference_mode()
def figure_2b(model: SparseMedicalViT, sets: dict, count: int, out: str, device: torch.device,
              name: str = "") -> list:
    """Fig. 2b: DINO-style maps (paper 3.4). First 3 PCs of the patch tokens of a few 2D images and CT volumes
    (one PCA over the modalities given, so a colour means the same components in both) -> RGB on the patch grid, stretched
    per map, nearest-upsampled to the input. Writes fig2b_{2d,3d}_{k}.png (input | PCA map | overlay, titled,
    with matplotlib; input | map side by side without it) and fig2b.json (which sample and slice each shows)."""
    p = model.patch
    items = [(mod, ds, i) for mod, ds in sets.items() for i in pick_examples(ds, count)]
    records = [ds[i] for _, ds, i in items]
    views = [whole_view(r, p) for r in records]
    packed = pack(views, p)
    model.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tokens = model.forward_features(packed.to(device)).float().cpu().numpy()  # (T, dim)
    for mod in sets:  # centre each modality, so the shared components show anatomy, not the 2D/3D offset
        own = np.isin(packed.token_view.numpy(), [v for v, (m, _, _) in enumerate(items) if m == mod])
        tokens[own] -= tokens[own].mean(0)
    pcs = PCA(n_components=3).fit_transform(tokens)  # (T, 3)
    written = []
    for v, ((mod, ds, i), record, view) in enumerate(zip(items, records, views)):
        gz, gy, gx = packed.view_grid[v].tolist()
        grid = pcs[packed.cu_seqlens[v]:packed.cu_seqlens[v + 1]].reshape(gz, gy, gx, 3)
        z = view.shape[1] // 2  # CT: the middle axial slice and the token slice that contains it
        fmap = stretch(grid[z // p]).repeat(p, axis=0).repeat(p, axis=1)  # nearest upsampling to the input size
        gray = view[0, z].numpy()
        entry = {"file": f"fig2b_{mod}_{sum(m == mod for m, _, _ in items[:v])}.png", "dataset": ds.name,
                 "split": ds.split, "id": record.id, "index": i, "input_shape": list(view.shape[1:]),
                 "cardiomegaly": CARD_STATE.get(float(record.labels[data.LABELS.index("Cardiomegaly")]), "unknown")}
        if mod == "3d":
            entry["slice"] = {"axis": "axial (Z: superior -> inferior)", "index": z, "of": int(view.shape[1]),
                              "token_slice": z // p}
        fig = draw_map(gray, fmap, entry, name, p, " and ".join(m.upper() for m in sets))
        path = os.path.join(out, entry["file"])
        if fig is None:  # no matplotlib: input | map, side by side at the input size
            img = np.concatenate([to_gray(gray), (fmap * 255).astype(np.uint8)], axis=1)
            data.atomic_write(path, lambda f: Image.fromarray(img).save(f, format="PNG"))
        else:
            save_figure(fig, path)
        written.append(entry)
    data.atomic_write(os.path.join(out, "fig2b.json"), lambda f: f.write(json.dumps(written, indent=1).encode()))
    return written


# ---------------------------------------------------------------- training curves (metrics.jsonl)

# metrics.jsonl keys drawn by figure_curves, one panel per entry: (title, [(key, legend label)]); a panel is
# drawn when some run logged one of its keys (older logs lack the embedding-health ones)
CURVES = (
    ("loss", [("loss", "")]),
    ("prediction loss (paper 2.2)", [("pred", "")]),
    ("SIGReg (paper 2.2)", [("sigreg", "")]),
    ("effective rank of the embeddings", [("rank_emb", "backbone"), ("rank_proj", "projector")]),
    ("mean per-dimension std", [("std_emb", "backbone"), ("std_proj", "projector")]),
    ("online linear probe: BCE", [("probe_bce", "")]),
    ("online linear probe: AUROC", [("probe_auroc", "")]),
)


def read_metrics(path: str) -> list:
    """The logged steps of a metrics.jsonl (skipped-step records and a line cut short by a crash left out)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row and "skipped" not in row:
                rows.append(row)
    return rows


def figure_curves(runs: dict, path: str) -> list:
    """Training curves of one or more runs ({name: metrics.jsonl}) in one figure: loss, prediction, SIGReg and
    the embedding-health figures that were logged. Returns the panels drawn: none without matplotlib or a curve."""
    logs = {name: read_metrics(p) for name, p in runs.items()}
    has = lambda key: any(key in r for rows in logs.values() for r in rows)  # noqa: E731
    panels = [(title, [(k, label) for k, label in series if has(k)]) for title, series in CURVES]
    panels = [(title, series) for title, series in panels if series]
    cols = min(4, len(panels))
    fig = matplotlib_figure(figsize=(4.4 * cols, 3.6 * -(-len(panels) // cols) + 0.6), layout="constrained") \
        if panels else None
    if fig is None:
        return []
    axes = fig.subplots(-(-len(panels) // cols), cols, squeeze=False).ravel()
    for ax, (title, series) in zip(axes, panels):
        values = []
        for i, (name, rows) in enumerate(logs.items()):
            for j, (key, label) in enumerate(series):
                pts = np.array([(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))], float)
                pts = pts[np.isfinite(pts).all(1)] if len(pts) else pts
                legend = " ".join(s for s in (name if len(logs) > 1 else "", label) if s) or None
                if len(pts):  # a colour per run, a line style per series (backbone, projector)
                    ax.plot(pts[:, 0], pts[:, 1], color=f"C{i}", ls=("-", "--")[j % 2],
                            marker="." if len(pts) < 30 else None, label=legend)
                    values += pts[:, 1].tolist()
        if values and min(values) > 0 and max(values) > 20 * min(values):  # losses spanning decades
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training curves (metrics.jsonl): " + ", ".join(runs), fontsize=12)  # names, not this machine's paths
    save_figure(fig, path)
    return [title for title, _ in panels]
