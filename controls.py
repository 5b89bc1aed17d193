"""Controls for the linear probes: what the phantom labels need, measured with no model and with a model's tokens
pooled two ways (issue: S3 barely beats its random initialisation; this is the measurement of why).

    python controls.py --ckpt S3=runs/s3/last.pt --random-init --out results/controls

Each control goes through probe.py's own protocol (probe.fit_probes: per label, standardized features ->
logistic regression with C chosen on held-out training patients; probe.evaluate: macro AUROC, bootstrap CI),
on the same phantom splits as the tables (MIMIC = phantom2d, CT-RATE = phantom3d):
- pixels: the whole image (views.whole_view, as the model sees it) area-averaged onto a coarse grid, every
  value in its place: what a linear probe can read when position is kept.
- bag of patches: the mean of the image's P-pixel patches (each area-averaged 2x per axis): the same pixels
  with their positions thrown away, the input-side analogue of the model's mean-pooled embedding.
- a checkpoint's final tokens pooled as the paper's embedding (mean over the view, model.forward) and as the
  mean over each of 2 x 2 (2D) or 2 x 2 x 2 (3D) spatial cells of the view, concatenated: the same frozen tokens,
  with where they sit kept.
- the paper's LP ALL on the embedding, as is and with each modality's training mean removed from that
  modality's embeddings (train and test): whether the modality gap is what costs the joint probe.
If the pixels score far above the bag of patches, the labels live in where things are; if the cell-pooled
tokens score above the mean-pooled ones, the mean pooling is where the model's embedding loses it.

    python controls.py --shifts --ckpt S3=runs/s3/last.pt --random-init --out results/shifts

--shifts instead: the external acquisition one factor at a time (every trained row scored below its random
initialisation on the external 2D set, CheXpert's stand-in). The internal test patients are rendered again with
each of phantom.EXTERNAL_SHIFTS alone (resolution, noise, calibration), with all three (the external phantoms'
acquisition) and with none, the same patients and random draws each time; each checkpoint's embedding is scored
by the modality's probe trained on the internal training set (as the tables do) and by one trained on training
patients with the same shift (as Table 2's adapted probe). A factor that costs the first probe and not the
second moves the features without destroying the information; one that costs both destroys it.

    python controls.py --crops --ckpt S3=runs/s3/last.pt --random-init --out results/crops

--crops instead: does a view identify its own image, as LeJEPA's prediction loss asks (paper 2.2)? Training
views (views.make_loader: 2 global, 8 local crops) of 64 test phantoms at a time; for each local view, the
rank of its own sample's global centroid among the 64 centroids by the loss's own distance (squared error),
backbone embeddings (the probes' space). For CT samples the last two local slots are crops of the DRR
(--paired-views 2): whether a patient's radiograph lands at its own CT. Chance: median rank 32.5, top-1 1/64.

    python controls.py --nuisance --ckpt S3=runs/s3/last.pt --random-init --seed 100 --out results/nuisance

--nuisance instead: does the embedding follow the labels or the acquisition? A phantom's image also depends on
per-image draws that no label depends on (body size and offset, noise level, rib phase, the field's z extent and
centre, a CT's HU offset or a film's gamma: phantom_draws). Every crop of an image shares them, so crop
invariance can be met by encoding them. For each checkpoint, on the test phantoms of --seed: the share of the
backbone embedding's variance that a linear fit on those draws explains, beside the share the five labels
explain (all dimensions, and the top direction alone), and each draw's cross-validated R^2 read from the
embedding. The supervised row shows what an embedding that follows the labels looks like.

Imports data, phantom (its acquisition shifts and draws), views, features, probe (for its probes and metrics), pack,
numpy and torch; nothing imports it.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import phantom
import views
import features
import probe
from pack import pack

SETS = (("MIMIC", "phantom2d"), ("CT-RATE", "phantom3d"))
PIXEL_GRID = {"2d": (1, 16, 16), "3d": (8, 8, 8)}  # 256 and 512 values: well below the 1024 training samples
CELLS = 2  # cells per patched axis for the cell-pooled tokens


def pixel_features(record: data.Record, patch: int) -> np.ndarray:
    view = views.whole_view(record, patch)  # (1, Z, H, W)
    grid = PIXEL_GRID[record.modality]
    pooled = F.interpolate(view[None], size=grid, mode="area") if record.modality == "3d" else \
        F.interpolate(view, size=grid[1:], mode="area")
    return pooled.flatten().numpy()


def bag_of_patches(record: data.Record, patch: int) -> np.ndarray:
    view = views.whole_view(record, patch)[0]  # (Z, H, W)
    if record.modality == "2d":
        p = view[0].unfold(0, patch, patch).unfold(1, patch, patch).reshape(-1, 1, patch, patch)
        return F.avg_pool2d(p, 2).flatten(1).mean(0).numpy()
    p = view.unfold(0, patch, patch).unfold(1, patch, patch).unfold(2, patch, patch).reshape(-1, 1, patch, patch, patch)
    return F.avg_pool3d(p, 2).flatten(1).mean(0).numpy()


@torch.inference_mode()
def pooled_tokens(model, ds, batch_tokens: int = 32768) -> dict:
    """{"mean": (N, dim), "cells": (N, cells * dim)} of the frozen final tokens, with y and ids."""
    mean, cells, ys, ids = [], [], [], []
    for batch, records in features.whole_views(ds, model.patch, batch_tokens):
        packed = pack(batch, model.patch)
        tokens = model.forward_features(packed)  # (T, dim), packed order
        for v in range(len(batch)):
            sel = packed.token_view == v
            t, index, grid = tokens[sel], packed.patch_index[sel], packed.view_grid[v]
            patched = torch.tensor([packed.is_3d[v], True, True])  # a volume one patch deep still has 2^3 cells
            cell = torch.zeros(len(t), dtype=torch.long)
            for axis in torch.nonzero(patched).flatten().tolist():  # cell index over the patched axes
                cell = cell * CELLS + (index[:, axis] * CELLS // grid[axis]).clamp(max=CELLS - 1)
            n_cells = CELLS ** int(patched.sum())
            cells.append(torch.cat([t[cell == c].mean(0) if (cell == c).any() else t.mean(0)
                                    for c in range(n_cells)]).numpy())
            mean.append(t.mean(0).numpy())
        ys += [r.labels for r in records]
        ids += [r.id for r in records]
    return {"mean": np.stack(mean), "cells": np.stack(cells), "y": np.stack(ys), "ids": np.array(ids)}


def score(train: dict, test: dict, key: str, n_boot: int, seed: int) -> probe.Result:
    probes = probe.fit_probes(train[key], train["y"], train["ids"], seed=seed)
    return probe.evaluate(test["y"], probe.probe_scores(probes, test[key]), test["ids"], n_boot, seed)


def input_controls(split_ds: dict, patch: int) -> dict:
    out = {}
    for split, ds in split_ds.items():
        recs = [ds[i] for i in range(len(ds))]
        out[split] = {"pixels": np.stack([pixel_features(r, patch) for r in recs]),
                      "bag": np.stack([bag_of_patches(r, patch) for r in recs]),
                      "y": np.stack([r.labels for r in recs]), "ids": np.array([r.id for r in recs])}
    return out


def load(args) -> list:
    """--ckpt's checkpoints, and with --random-init the first one's architecture at a random initialisation."""
    checkpoints = features.load_checkpoints(args.ckpt, "auto")
    if args.random_init:
        checkpoints.append(features.random_init(checkpoints[0], "auto", args.seed))
    return checkpoints


def run(args) -> dict:
    checkpoints = load(args)
    a = checkpoints[0].train_args
    report = {"n_train": args.n_train, "n_test": args.n_test, "seed": args.seed, "rows": []}
    embeddings = {}  # {checkpoint: {test set: {split: pooled tokens}}}
    for paper, name in SETS:
        modality = data.phantom_modality(name)
        size = a.get(f"size_{modality}")
        split_ds = {s: data.open_dataset(name, s, n=n, size=size, seed=args.seed)
                    for s, n in (("train", args.n_train), ("test", args.n_test))}
        x = input_controls(split_ds, checkpoints[0].model.patch)
        rows = [("pixels in place " + "x".join(map(str, PIXEL_GRID[modality])), "pixels"),
                ("bag of patches (positions lost)", "bag")]
        for label, key in rows:
            r = score(x["train"], x["test"], key, args.bootstrap, args.seed)
            report["rows"].append({"test_set": f"{paper} ({name})", "features": label, "macro": r.macro,
                                   "ci": list(r.macro_ci)})
        for c in checkpoints:
            f = {s: pooled_tokens(c.model, ds) for s, ds in split_ds.items()}
            embeddings.setdefault(c.name, {})[paper] = f
            for key, label in (("mean", "mean over the view (the paper's embedding)"),
                               ("cells", f"mean over each of {CELLS}^{2 if modality == '2d' else 3} cells")):
                r = score(f["train"], f["test"], key, args.bootstrap, args.seed)
                report["rows"].append({"test_set": f"{paper} ({name})", "features": f"{c.name}: tokens, {label}",
                                       "macro": r.macro, "ci": list(r.macro_ci)})
        print(f"controls: {paper} done", flush=True)
    for name, by_set in embeddings.items():
        report["rows"] += all_probe_rows(name, by_set, args.bootstrap, args.seed)
    return report


def all_probe_rows(name: str, by_set: dict, n_boot: int, seed: int) -> list:
    """The paper's LP ALL (one probe on the 2D and 3D training embeddings together) as is, and with each
    modality's training mean removed from that modality's embeddings: the modality gap, one factor."""
    rows = []
    for centred in (False, True):
        shift = {p: f["train"]["mean"].mean(0) if centred else 0.0 for p, f in by_set.items()}
        train = {k: np.concatenate([f["train"][k] for f in by_set.values()]) for k in ("y", "ids")}
        train["mean"] = np.concatenate([f["train"]["mean"] - shift[p] for p, f in by_set.items()])
        probes = probe.fit_probes(train["mean"], train["y"], train["ids"], seed=seed)
        for p, f in by_set.items():
            test = f["test"]
            r = probe.evaluate(test["y"], probe.probe_scores(probes, test["mean"] - shift[p]), test["ids"], n_boot, seed)
            rows.append({"test_set": f"{p} ({dict(SETS)[p]})", "macro": r.macro, "ci": list(r.macro_ci),
                         "features": f"{name}: LP ALL on the embedding" + (", each modality's mean removed" if centred else "")})
    return rows


SHIFT_SETTINGS = ((), *((shift,) for shift in phantom.EXTERNAL_SHIFTS), phantom.EXTERNAL_SHIFTS)


def shift_report(args) -> dict:
    """--shifts (module docstring): {"rows": [{test_set, shift, model, probe, macro, ci}], ...}."""
    checkpoints = load(args)
    a = checkpoints[0].train_args
    report = {"n_train": args.n_train, "n_test": args.n_test, "seed": args.seed, "rows": []}
    for paper, name in SETS:
        size = a.get(f"size_{'3d' if '3d' in name else '2d'}")

        def embed(split, n, shifts):
            ds = data.PhantomDataset(name, split, n=n, size=size, seed=args.seed, shifts=shifts)
            return {c.name: pooled_tokens(c.model, ds) for c in checkpoints}

        internal = embed("train", args.n_train, None)
        for shifts in SHIFT_SETTINGS:
            test = embed("test", args.n_test, shifts)
            trains = {"internal": internal, "same shift": embed("train", args.n_train, shifts) if shifts else internal}
            for c in checkpoints:
                for where, train in trains.items():
                    r = score(train[c.name], test[c.name], "mean", args.bootstrap, args.seed)
                    report["rows"].append({"test_set": f"{paper} ({name})", "shift": " + ".join(shifts) or "none",
                                           "model": c.name, "probe": where, "macro": r.macro, "ci": list(r.macro_ci)})
        print(f"controls --shifts: {paper} done", flush=True)
    return report


CROP_BATCH, CROP_PAIRED = 64, 2


@torch.inference_mode()
def crop_ranks(model, ds, steps: int, seed: int, paired: int, drr_size: int) -> dict:
    """{view kind: ranks (one per local view and sample)} of each local view's own global centroid (module
    docstring); paired > 0 for CT: the last `paired` local slots are DRR crops at long side drr_size."""
    is_3d = ds.modality == "3d"
    loader = views.make_loader(None if is_3d else ds, ds if is_3d else None, batch_2d=0 if is_3d else CROP_BATCH,
                               batch_3d=CROP_BATCH if is_3d else 0, steps=steps, patch=model.patch, seed=seed,
                               paired_views=paired if is_3d else 0, drr_size=drr_size)
    out = {}
    for batch in loader:
        z = model(batch.packed).view(batch.n_views, batch.n_samples, -1)  # view-major (views.Batch)
        centroid = z[:batch.n_global].mean(0)
        for slot in range(batch.n_global, batch.n_views):
            drr = is_3d and slot >= batch.n_views - paired
            kind = "DRR crop" if drr else f"{ds.modality.upper()} local crop"
            d = torch.cdist(z[slot], centroid)  # (n, n): view of sample i to the centroid of sample j
            out.setdefault(kind, []).append((d <= d.diagonal()[:, None]).sum(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def crop_report(args) -> dict:
    """--crops (module docstring): {"rows": [{test_set, model, views, median rank, top-1, n}], ...}."""
    checkpoints = load(args)
    a = checkpoints[0].train_args
    steps = max(1, args.n_test // CROP_BATCH)
    report = {"batch": CROP_BATCH, "samples": steps * CROP_BATCH, "seed": args.seed, "rows": []}
    for paper, name in SETS:
        modality = data.phantom_modality(name)
        ds = data.open_dataset(name, "test", n=steps * CROP_BATCH, size=a.get(f"size_{modality}"), seed=args.seed)
        for c in checkpoints:
            drr_size = c.train_args.get("size_2d") or data.XRAY_SIZE
            ranks = crop_ranks(c.model, ds, steps, args.seed, CROP_PAIRED, drr_size)
            for kind, r in ranks.items():
                report["rows"].append({"test_set": f"{paper} ({name})", "model": c.name, "views": kind,
                                       "median rank": float(np.median(r)), "top-1": float((r == 1).mean()),
                                       "n": int(len(r))})
    return report


def crop_markdown(report: dict) -> str:
    lines = [f"**Do a sample's crops identify it?** (each local view's own global centroid ranked among "
             f"{report['batch']} test phantoms' by squared distance, backbone embeddings; {report['samples']} "
             f"samples per set, seed {report['seed']}; chance: median rank {(report['batch'] + 1) / 2:g}, top-1 "
             f"{1 / report['batch']:.3f})", "", "| Test set | Model | Views | Median rank | Top-1 |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['test_set']} | {r['model']} | {r['views']} | {r['median rank']:g} | {r['top-1']:.3f} |"
              for r in report["rows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- --nuisance

NUISANCES = ("body size", "body offset x", "body offset y", "noise level", "rib phase", "z extent", "z centre",
             "intensity")  # intensity: the HU offset of a CT, the gamma of a radiograph


def phantom_draws(name: str, split: str, n: int, seed: int) -> tuple:
    """(nuisances (n, len(NUISANCES)), labels (n, 5)) of a phantom split's first n samples: the per-image draws
    of phantom.sample_patient and phantom.field_of_view that no label depends on, from the samples' own rngs."""
    modality = data.phantom_modality(name)
    rows, labels = [], []
    for i in range(n):
        rng = phantom.phantom_rng(name, split, i, seed)
        p = phantom.sample_patient(rng)
        half_z, centre = phantom.field_of_view(rng, modality)
        rows.append([p["scale"], *p["offset"], p["noise"], p["rib_phase"], half_z, centre,
                     p["hu_offset"] if modality == "3d" else p["gamma"]])
        labels.append(p["labels"])
    return np.array(rows, np.float64), np.array(labels, np.float64)


def explained(x: np.ndarray, t: np.ndarray) -> float:
    """Share of x's total variance (all columns) that a least-squares fit on t (with intercept) explains."""
    x = x - x.mean(0)
    a = np.column_stack([t - t.mean(0), np.ones(len(t))])
    resid = x - a @ np.linalg.lstsq(a, x, rcond=None)[0]
    return float(1 - (resid ** 2).sum() / (x ** 2).sum())


def decodable(x: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
    """Cross-validated R^2 (5 folds, ridge with its penalty chosen inside each fold) of each column of t read
    linearly from x: how much of each draw the embedding carries, whatever its share of the variance."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    folds = KFold(5, shuffle=True, random_state=seed)
    pred = np.column_stack([cross_val_predict(model, x, col, cv=folds) for col in t.T])
    return 1 - ((t - pred) ** 2).sum(0) / ((t - t.mean(0)) ** 2).sum(0)


def nuisance_report(args) -> dict:
    """--nuisance: what each embedding follows, the labels or the acquisition (module docstring)."""
    checkpoints = load(args)
    a = checkpoints[0].train_args
    report = {"n": args.n_test, "seed": args.seed, "nuisances": list(NUISANCES), "rows": []}
    for paper, name in SETS:
        modality = data.phantom_modality(name)
        ds = data.open_dataset(name, "test", n=args.n_test, size=a.get(f"size_{modality}"), seed=args.seed)
        feats = features.extract_features_of([c.model for c in checkpoints], ds, 32768)
        t, y = phantom_draws(name, "test", args.n_test, args.seed)
        assert np.array_equal(y, feats[0]["y"]), "phantom_draws must follow the dataset's own patients"
        for c, f in zip(checkpoints, feats):
            x = f["x"].astype(np.float64)
            top = np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :1]  # the top direction's scores
            report["rows"].append({"test_set": f"{paper} ({name})", "model": c.name,
                                   "variance by nuisances": explained(x, t), "variance by labels": explained(x, y),
                                   "top direction by nuisances": explained(top, t),
                                   "top direction by labels": explained(top, y),
                                   "decodable": dict(zip(NUISANCES, decodable(x, t, args.seed).tolist())),
                                   "labels decodable": decodable(x, y, args.seed).tolist()})
        print(f"controls: {paper} done", flush=True)
    return report


def nuisance_markdown(report: dict) -> str:
    shares = ("variance by nuisances", "variance by labels", "top direction by nuisances", "top direction by labels")
    lines = [f"**What the embedding follows: the acquisition or the labels** (backbone embeddings of {report['n']} "
             f"test phantoms per set, seed {report['seed']}; the share of the embedding's variance that a linear fit "
             f"on the {len(report['nuisances'])} per-image nuisance draws, or on the 5 labels, explains, for all "
             f"dimensions and for the top direction; then each draw's cross-validated R^2 read from the embedding)",
             "", "| Test set | Model | " + " | ".join(shares) + " | mean label R^2 | " +
             " | ".join(report["nuisances"]) + " |", "| --- | --- |" + " --- |" * (len(shares) + 1 + len(report["nuisances"]))]
    for r in report["rows"]:
        cells = [f"{r[k]:.0%}" for k in shares] + [f"{np.mean(r['labels decodable']):.2f}"]
        cells += [f"{r['decodable'][k]:.2f}" for k in report["nuisances"]]
        lines.append(f"| {r['test_set']} | {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shift_markdown(report: dict) -> str:
    models = list(dict.fromkeys(r["model"] for r in report["rows"]))
    cell = {(r["test_set"], r["shift"], r["model"], r["probe"]): probe.fmt_ci(r["macro"], r["ci"]) for r in report["rows"]}
    head = [f"{m}, probe trained {'on internal' if p == 'internal' else 'with the same shift'}"
            for m in models for p in ("internal", "same shift")]
    lines = [f"**The external acquisition one factor at a time** (the internal test patients re-rendered; LP macro "
             f"AUROC of the modality's probe, 95% CI; {report['n_train']} train and {report['n_test']} test phantoms, "
             f"seed {report['seed']})", "", "| Test patients | Shift | " + " | ".join(head) + " |",
             "| --- | --- |" + " --- |" * len(head)]
    for test_set, shift in dict.fromkeys((r["test_set"], r["shift"]) for r in report["rows"]):
        lines.append(f"| {test_set} | {shift} | " + " | ".join(cell[(test_set, shift, m, p)] for m in models
                                                              for p in ("internal", "same shift")) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [f"**Controls** (LP macro AUROC, 95% CI; {report['n_train']} train and {report['n_test']} test phantoms "
             f"per set, seed {report['seed']})", "", "| Test set | Features | Macro (95% CI) |", "| --- | --- | --- |"]
    lines += [f"| {r['test_set']} | {r['features']} | {probe.fmt_ci(r['macro'], r['ci'])} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


MODES = {"controls": (run, markdown), "shifts": (shift_report, shift_markdown), "crops": (crop_report, crop_markdown),
         "nuisance": (nuisance_report, nuisance_markdown)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoint(s), PATH or NAME=PATH")
    p.add_argument("--random-init", action="store_true", help="also the first checkpoint's architecture at a random init")
    p.add_argument("--n-train", type=int, default=1024, help="phantom train samples per set (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=1024, help="phantom test samples per set (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="phantoms, held-out split and bootstrap (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shifts", action="store_true",
                      help="instead: the external acquisition one factor at a time -> shifts.md/.json (module docstring)")
    mode.add_argument("--crops", action="store_true",
                      help="instead: does each local view identify its own sample (and a CT its DRR)? -> crops.md/.json")
    mode.add_argument("--nuisance", action="store_true",
                      help="instead: does the embedding follow the labels or the per-image acquisition? -> nuisance.md/.json")
    p.add_argument("--out", default="results/controls", help="folder for controls.md/.json (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        stem = next((m for m in ("shifts", "crops", "nuisance") if getattr(args, m)), "controls")
        measure, write = MODES[stem]
        report = measure(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"controls.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    text = write(report)
    data.atomic_write(os.path.join(args.out, f"{stem}.md"), lambda f: f.write(text.encode()))
    data.atomic_write(os.path.join(args.out, f"{stem}.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
