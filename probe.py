"""Linear-probe evaluation of frozen SparseMedicalViT features (paper section 3).

    python probe.py --ckpt S1=runs/s1/last.pt S2=runs/s2/last.pt S3=runs/s3/last.pt Supervised=runs/sup/last.pt

1. Features (features.py): each checkpoint's frozen backbone embeds every
   whole image or volume (one view per sample; the backbone embedding, not the
   projector) in packed batches under a token budget, cached on disk per
   (checkpoint, dataset, split); or another encoder's embeddings files (--features).
2. Probes: per label, standardized features -> logistic regression, trained
   on the pre-training datasets' train split (LP 2D, 3D or ALL) where that
   label is known; C is chosen on a patient-disjoint held-out part of the
   training data, never on a test set.
3. Metrics: per-label and macro AUROC with 95% bootstrap CIs (patients resampled).
4. Outputs: Tables 1-3 (.md, .csv, .json) and Figure 2a's numbers (paper 3.4:
   probes on the top principal components of the joint embeddings, per
   modality, fig2a.md/.json); figures.py draws Figure 2a and 2b (fig2a.png,
   fig2b_*.png) and the training curves (curves.png, `probe.py curves RUN...`).

Imports data, features, figures and scikit-learn; `probe.py embed` is features.embed.
"""
import argparse
import csv
import io
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import data
import features
import figures
import retrieval

SHORT = ("ATEL", "CARD", "CONS", "LO", "EFF")  # the paper's column names, in data.LABELS order
LP_MODES = ("2D", "3D", "ALL")
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strength of the probe, chosen on held-out training data
HELD_OUT = 0.2  # fraction of training patients held out to choose C
N_PCS = 10  # Figure 2a: principal components the logistic regression sees
MIN_POSITIVES = 10  # fewer positives of a label in a test set are too few to score: AUROC flagged, not in Macro
# role: (paper name, real dataset, its split, phantom stand-in, its split, kind)
ROLES = {
    "train_2d": ("MIMIC", "mimic", "train", "phantom2d", "train", "LP training"),
    "train_3d": ("CT-RATE", "ctrate", "train", "phantom3d", "train", "LP training"),
    "mimic": ("MIMIC", "mimic", "test", "phantom2d", "test", "internal test set"),
    "chexpert": ("CheXpert", "chexpert", "test", "phantom2d-ext", "test", "external test set"),
    "ctrate": ("CT-RATE", "ctrate", "valid", "phantom3d", "test", "internal test set"),
    # paper 2.4.1: Table 1's external test set is all of RAD-ChestCT (trn + val + tst, n=3,630); Table 2 retrains
    # the probe on its train split and tests on its test split (its stand-in here: phantom3d-ext test, both)
    "radchest": ("RAD-ChestCT", "radchest", data.ALL_SPLITS, "phantom3d-ext", "test", "external test set, all splits"),
    "radchest_train": ("RAD-ChestCT", "radchest", "train", "phantom3d-ext", "train", "Table 2 LP training"),
    "radchest_test": ("RAD-ChestCT", "radchest", "test", "phantom3d-ext", "test", "Table 2 test set"),
    # beyond the paper: the internal 3D test patients as radiographs (phantoms rendered both ways; for a cache,
    # the DRRs of its CT volumes), paired with "ctrate" by id: cross-modal retrieval and label transfer
    "paired_2d": ("CT-RATE", "ctrate", "valid", "phantom3d-xray", "test",
                  "radiographs (a cache: DRRs) of the internal 3D test patients"),
}
PAIRED = ("paired_2d", "ctrate")  # (radiographs, CTs) of the same patients
TEST_SETS = ("mimic", "chexpert", "ctrate", "radchest")
# a public dataset that takes a paper dataset's roles when that one is not in --data: NIH ChestX-ray14 (no
# credentials, four of the five labels, Lung Opacity unknown) as the labelled 2D set in MIMIC's place
STAND_INS = {"mimic": ("nih", "NIH ChestX-ray14")}
LP_TRAIN = {"2D": ("train_2d",), "3D": ("train_3d",), "ALL": ("train_2d", "train_3d")}  # paper 3: LP training data


# ---------------------------------------------------------------- metrics

def weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of scores s (n,) for 0/1 labels y (n,), once per row of sample weights w (B, n) -> (B,).

    Mann-Whitney: P(s_pos > s_neg) + 0.5 P(s_pos == s_neg), each sample counted
    w times (a bootstrap resample is a weight vector). NaN when a class is absent.
    """
    if len(s) == 0:  # no sample with a known label and a score (no probe, or the label unknown throughout)
        return np.full(len(w), np.nan)
    order = np.argsort(s, kind="stable")
    s, pos_mask, w = s[order], y[order] > 0.5, w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first sample of each distinct score
    pos = np.add.reduceat(w * pos_mask, starts, axis=1)  # (B, K) positive weight per distinct score
    neg = np.add.reduceat(w * ~pos_mask, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each score
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Rank-based AUROC with ties counted one half; NaN if y holds one class only."""
    return float(weighted_auroc(np.asarray(y), np.asarray(s), np.ones((1, len(y))))[0])


def patients(ids: np.ndarray) -> np.ndarray:
    """data.py ids are 'patient/study/...': the part before the first '/' names the patient."""
    return np.array([str(i).split("/")[0] for i in ids])


@dataclass
class Result:
    """AUROC of one probe on one test set. NaN marks n/a: one class of the label in the test set, no probe, or a
    label the dataset does not have (n_known 0). A label with fewer than MIN_POSITIVES positives keeps its AUROC
    but is too few to score: left out of the macro (in_macro False)."""
    auroc: list     # (L,) per label
    ci: list        # (L, 2) 95% bootstrap CI per label
    macro: float    # mean over the labels in_macro
    macro_ci: list  # (2,)
    n: int
    n_pos: list     # (L,) positives per label in the test set (n+)
    n_known: list   # (L,) test samples labelled for it; 0: the dataset has no such label (NIH: Lung Opacity)
    in_macro: list  # (L,) bool: AUROC defined and at least MIN_POSITIVES positives


def evaluate(y: np.ndarray, scores: np.ndarray, ids: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Result:
    """Per-label and macro AUROC with 95% CIs from a bootstrap over patients (all of a patient's studies)."""
    n, n_labels = y.shape
    known = ~np.isnan(y) & ~np.isnan(scores)
    point = np.array([auroc(y[known[:, j], j], scores[known[:, j], j]) for j in range(n_labels)])
    defined = ~np.isnan(point)
    n_pos = (y > 0.5).sum(axis=0)  # NaN (unknown) is no positive
    in_macro = defined & (n_pos >= MIN_POSITIVES)
    uniq, inv = np.unique(patients(ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    boot = np.full((n_labels, n_boot), np.nan)
    chunk = max(1, 2_000_000 // n)  # resamples per chunk: bounds the (chunk, n) weight matrix
    for b0 in range(0, n_boot, chunk):
        counts = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=min(chunk, n_boot - b0))
        w = counts[:, inv].astype(np.float64)  # a drawn patient brings all of its samples
        for j in np.flatnonzero(defined):
            k = known[:, j]
            boot[j, b0:b0 + len(w)] = weighted_auroc(y[k, j], scores[k, j], w[:, k])
    ci, macro, macro_ci = np.full((n_labels, 2), np.nan), np.nan, [np.nan, np.nan]
    if in_macro.any():  # n/a labels and labels too few to score are left out of the macro and its CI
        macro = float(point[in_macro].mean())
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN when a resample drew one class only
        if defined.any() and n_boot > 0:
            ci[defined] = np.nanpercentile(boot[defined], [2.5, 97.5], axis=1).T
        if in_macro.any() and n_boot > 0:
            macro_ci = np.nanpercentile(np.nanmean(boot[in_macro], axis=0), [2.5, 97.5]).tolist()
    return Result(point.tolist(), ci.tolist(), macro, macro_ci, n, n_pos.tolist(),
                  (~np.isnan(y)).sum(axis=0).tolist(), in_macro.tolist())


# ---------------------------------------------------------------- probes

def make_probe(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def patient_holdout(ids: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out part chosen by patient: no patient lies on both sides."""
    who = patients(ids)
    uniq = np.unique(who)
    held = np.random.default_rng(seed).choice(uniq, size=max(1, round(frac * len(uniq))), replace=False)
    return np.isin(who, held)


def fit_label(x: np.ndarray, y: np.ndarray, ids: np.ndarray, seed: int = 0, name: str = "a label"):
    """One label's probe, C chosen by held-out AUROC; None if the training data has one class."""
    if len(np.unique(y)) < 2:
        return None
    held = patient_holdout(ids, HELD_OUT, seed)
    best_c, best = 1.0, -np.inf
    if len(np.unique(y[held])) < 2 or len(np.unique(y[~held])) < 2:
        warnings.warn(f"{name}: {int(y.sum())} positives of {len(y)} are too few to choose C on a held-out part "
                      f"of the patients; C = {best_c}", stacklevel=2)
    else:
        for c in C_GRID:
            a = auroc(y[held], make_probe(c).fit(x[~held], y[~held]).decision_function(x[held]))
            if a > best:
                best_c, best = c, a
    return make_probe(best_c).fit(x, y)


def fit_probes(x: np.ndarray, y: np.ndarray, ids: np.ndarray, seed: int = 0) -> list:
    """Paper 3: one probe per label, trained on the samples where that label is known (NaN skipped)."""
    probes = []
    for j in range(y.shape[1]):
        k = ~np.isnan(y[:, j])
        probes.append(fit_label(x[k], y[k, j], ids[k], seed, name=data.LABELS[j]))
    return probes


def probe_scores(probes: list, x: np.ndarray) -> np.ndarray:
    """(N, L) decision values; NaN for a label without a probe."""
    return np.stack([p.decision_function(x) if p else np.full(len(x), np.nan) for p in probes], axis=1)


def load_external(items: list, datasets: dict, taken: set, lps: list) -> dict:
    """`--features NAME=DIR` items -> {name: (DIR, {role: features})} for the roles whose file DIR holds.

    One encoder, one width: every file of a DIR must have the same D.
    """
    out = {}
    for item in items:
        name, folder = features.named(item)
        name = name or os.path.basename(os.path.normpath(folder))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: --features folder not found")
        if name in taken or name in out:
            raise ValueError(f"--features {item}: the name {name!r} is already taken; give NAME=DIR")
        feats, width = {}, None
        for role, ds in datasets.items():
            path = features.features_path(folder, ds)
            if not os.path.exists(path):
                continue
            feats[role] = features.external_features(path, ds)
            if width is not None and feats[role]["x"].shape[1] != width[1]:
                raise ValueError(f"{path}: width {feats[role]['x'].shape[1]}, but {width[0]} has {width[1]}: "
                                 "one encoder, one width")
            width = width or (path, feats[role]["x"].shape[1])
        if not any(all(r in feats for r in LP_TRAIN[lp]) for lp in lps):
            wanted = sorted({os.path.basename(features.features_path(folder, datasets[r])) for lp in lps for r in LP_TRAIN[lp]})
            raise ValueError(f"{folder}: no LP training features for --features {name} with --lp {','.join(lps)}: "
                             f"expected {' and/or '.join(wanted)}")
        out[name] = (folder, feats)
    return out


# ---------------------------------------------------------------- data roles

@dataclass(frozen=True)
class Source:
    title: str  # how tables name it, e.g. "MIMIC (phantom2d test)"
    spec: str   # data.open_dataset spec: phantom name or cache dir
    split: str


def resolve_sources(data_args: list, lps: list) -> dict:
    """role -> Source for the phantom suite or the caches given (roles whose dataset is absent are left out)."""
    if data_args == ["phantom"]:
        return {role: Source(f"{paper} ({phantom} {psplit})", phantom, psplit)
                for role, (paper, _, _, phantom, psplit, _) in ROLES.items()}
    by_name, shown = {}, {}
    for spec in data_args:
        by_name[data.describe(spec)["name"]] = spec
    for name, (stand_in, title) in STAND_INS.items():
        if name not in by_name and stand_in in by_name:
            by_name[name], shown[name] = by_name[stand_in], title
    sources = {role: Source(f"{shown.get(name, paper)} ({kind})" if "test" in kind else
                            f"{shown.get(name, paper)} {split}", by_name[name], split)
               for role, (paper, name, split, _, _, kind) in ROLES.items()
               if name in by_name and (split == data.ALL_SPLITS or split in data.list_splits(by_name[name]))}
    for lp in lps:
        missing = [ROLES[r][1] for r in LP_TRAIN[lp] if r not in sources]
        if missing:
            raise ValueError(f"--lp {lp} trains on the {'/'.join(missing)} train split: add its cache to --data "
                             f"(got {data_args}) or drop {lp} from --lp")
    if not any(t in sources for t in TEST_SETS):
        raise ValueError(f"--data {data_args}: none of the test sets {[ROLES[t][1] for t in TEST_SETS]} found")
    return sources


def open_datasets(sources: dict, args) -> dict:
    """role -> dataset; the phantom options (n per split, size per modality, seed) go to phantom specs only.
    The paired radiographs' role given CT volumes (a cache; phantoms with --paired-2d drr) holds their DRRs."""
    out = {}
    for role, src in sources.items():
        options = {}
        if src.spec in data.PHANTOMS or src.spec in data.PAIRED_PHANTOMS:
            n = args.n_train if src.split == "train" else args.n_test
            size = args.size_3d if src.spec in data.PHANTOMS and "3d" in src.spec else args.size_2d
            options = {k: v for k, v in (("n", n), ("size", size)) if v is not None} | {"seed": args.seed}
        out[role] = data.open_dataset(src.spec, src.split, **options)
        if role == PAIRED[0] and out[role].modality == "3d":
            out[role] = data.DrrDataset(out[role], args.size_2d or data.XRAY_SIZE)
    return out


def paired_drrs(sources: dict) -> dict:
    """--paired-2d drr on phantoms: the paired radiographs are the DRRs of the CT-RATE stand-in's test CTs."""
    ct = sources[PAIRED[1]]
    return sources | {PAIRED[0]: Source(f"{ROLES[PAIRED[0]][0]} ({ct.spec} {ct.split}, DRRs)", ct.spec, ct.split)}



# ---------------------------------------------------------------- tables

def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.{digits}f}"


def fmt_ci(v: float, ci) -> str:
    """v (lo-hi); None (strict JSON's NaN) or NaN bounds: v alone."""
    return fmt(v) if ci[0] is None or np.isnan(ci[0]) else f"{fmt(v)} ({fmt(ci[0])}-{fmt(ci[1])})"


@dataclass
class Table:
    title: str
    columns: list  # columns[0] groups rows into sections (a header row in Markdown), columns[1:] are shown
    rows: list     # lists of strings, one per column
    notes: list
    data: list     # the numbers behind the rows (for table*.json)


def to_markdown(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(t.columns[1:]) + " |", "|" + " --- |" * (len(t.columns) - 1)]
    section = None
    for row in t.rows:
        if row[0] != section:
            section = row[0]
            lines.append(f"| **{section}** |" + " |" * (len(t.columns) - 2))
        lines.append("| " + " | ".join(row[1:]) + " |")
    return "\n".join(lines + [""] + [f"{n}  " for n in t.notes]) + "\n"


def write_tables(out: str, stem: str, tables: list) -> str:
    """stem.md, stem.csv (one header; an 'Analysis' column when several tables share it) and stem.json."""
    md = "\n".join(to_markdown(t) for t in tables)
    several = len(tables) > 1

    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow((["Analysis"] if several else []) + tables[0].columns)
    for t in tables:
        w.writerows(([t.title] if several else []) + r for r in t.rows)
    write_text(os.path.join(out, f"{stem}.md"), md)
    write_text(os.path.join(out, f"{stem}.csv"), rows.getvalue())
    write_text(os.path.join(out, f"{stem}.json"), json.dumps([asdict(t) for t in tables], indent=1))
    return md


def write_text(path: str, text: str):
    data.atomic_write(path, lambda f: f.write(text.encode()))


def _clean(v):
    """NaN -> None, recursively, so table*.json is strict JSON."""
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return None if isinstance(v, float) and np.isnan(v) else v


FEW = "†"  # marks an AUROC of a label with fewer than MIN_POSITIVES positives: shown, too few to score


def flag(r: Result, j: int) -> str:
    """FEW after label j's cells when its AUROC is defined but its positives are too few for the macro."""
    return FEW if not np.isnan(r.auroc[j]) and not r.in_macro[j] else ""


def result_cells(r: Result) -> list:
    return [fmt(a) + flag(r, j) for j, a in enumerate(r.auroc)] + [fmt_ci(r.macro, r.macro_ci)]


def positives(r: Result, j: int) -> str:
    """Label j's n+ cell: its positives in the test set; n/a for a label the dataset does not have."""
    return str(r.n_pos[j]) if r.n_known[j] else "n/a"


def result_data(r: Result, **where) -> dict:
    return {**where, **{k: _clean(v) for k, v in asdict(r).items()}}


NA_NOTE = ("n/a: only one class of that label in the test set, or no probe for it (one class in the LP training "
           "data); excluded from Macro.")


def end_notes(names: list, external: dict, tested: list) -> list:
    """The notes every table ends with: which rows are external features, the labels a test set's dataset does
    not have, the labels too few to score, and n/a for any other reason. tested: (test set title, Result) per row."""
    notes = [f"{name}: external features read from {external[name]} (another encoder's frozen embeddings, "
             "through the same probes, splits and bootstrap)" for name in names if name in external]
    absent, few, na = {}, {}, False
    for title, r in tested:
        for j, a in enumerate(r.auroc):
            if r.n_known[j] == 0:  # not one test sample labelled: the dataset has no such label (NIH: Lung Opacity)
                absent.setdefault(title, {})[data.LABELS[j]] = SHORT[j]
            elif flag(r, j):
                few.setdefault(title, {})[SHORT[j]] = r.n_pos[j]
            na |= bool(np.isnan(a)) and r.n_known[j] > 0
    notes += [f"{title} has no {' or '.join(labels)} label ({', '.join(labels.values())} n/a: no test sample is "
              "labelled for it); excluded from Macro." for title, labels in absent.items()]
    if few:
        counts = "; ".join(f"{title}: " + ", ".join(f"{label} (n+ {k})" for label, k in labels.items())
                           for title, labels in few.items())
        notes.append(f"{FEW}: fewer than {MIN_POSITIVES} positives (n+) in the test set, too few to score: the "
                     f"AUROC is shown, but excluded from Macro. {counts}.")
    return notes + ([NA_NOTE] if na else [])


def table_1(results: dict, names: list, lp_of: dict, titles: dict, external: dict) -> Table:
    """Per test set, its positives per label (n+), then one row per model: per-label AUROC and macro (95% CI),
    LP lp_of[name]."""
    rows, rdata, tested = [], [], []
    for t in [t for t in TEST_SETS if t in titles]:
        counted = False
        for name in names:
            lp = lp_of[name]
            if t not in results[name][lp]:  # external features without this test set
                continue
            r = results[name][lp][t]
            if not counted:  # every row of a test set has its labels: count them once
                rows.append([titles[t], f"n+ (of {r.n})", "", *[positives(r, j) for j in range(len(SHORT))], ""])
                counted = True
            rows.append([titles[t], name, lp, *result_cells(r)])
            rdata.append(result_data(r, test_set=titles[t], model=name, lp=lp))
            tested.append((titles[t], r))
    notes = ["LP=Linear Probing, ATEL=Atelectasis, CARD=Cardiomegaly, CONS=Consolidation, LO=Lung Opacity, "
             "EFF=Pleural Effusion; n+: the positives of each label in the test set (of n samples). "
             "95% CI: bootstrap over patients.", *end_notes(names, external, tested)]
    if "radchest" in titles:
        notes.append("RAD-ChestCT: every split of the release (trn + val + tst, n=3,630 in the paper, 2.4.1); "
                     "Table 2 tests on its test split only. The phantom stand-in is phantom3d-ext test.")
    return Table("Table 1: linear-probe AUROC on frozen features", ["Test set", "Model", "LP Training Data",
                 *SHORT, "Macro (95% CI)"], rows, notes, rdata)


def gain(after: float, before: float) -> float:
    """paper Table 2 reports the AUROC difference x 100, not a relative change: its macro 0.66 -> 0.75 is 9.12."""
    return 100 * (after - before) if not (np.isnan(after) or np.isnan(before)) else np.nan


def table_2(adapted: dict, before: dict, train: str, test: str, external: dict) -> Table:
    """Domain adaptation: probe retrained on the external set's train split, improvement over the un-adapted probe."""
    rows, rdata, tested = [], [], []
    for name, r in adapted.items():
        b = before[name]  # the same test split: the same labels, n+ and flags
        for j, (label, a, c, p) in enumerate(zip(SHORT, r.auroc, r.ci, b.auroc)):
            rows.append([name, label, positives(r, j), fmt_ci(a, c) + flag(r, j), fmt(gain(a, p), 2) + flag(r, j),
                         fmt(p) + flag(b, j)])
        rows.append([name, "Macro", "", fmt_ci(r.macro, r.macro_ci), fmt(gain(r.macro, b.macro), 2), fmt(b.macro)])
        rdata.append({"model": name, "adapted": result_data(r), "before": result_data(b)})
        tested += [(test, r), (test, b)]
    notes = [f"Probe retrained on {train}, tested on {test}; the improvement and 'AUROC before adaptation' "
             "refer to the probe trained on the pre-training data (Table 1's probe) scored on the same test split "
             "(the paper's 0.66 before is its Table 1 figure, on every split). The improvement is the AUROC "
             "difference x 100, the paper's 'Improvement (%)' (0.66 -> 0.75: 9.12). n+: the positives of each "
             "label in the test split.", *end_notes(list(adapted), external, tested)]
    columns = ["Model", "Label", "n+", "AUROC (95% CI)", "Improvement (AUROC points x 100)", "AUROC before adaptation"]
    return Table(f"Table 2: domain adaptation on {test}", columns, rows, notes, rdata)


def table_retrieval(feats: dict, titles: dict, n_boot: int, seed: int) -> Table:
    """Cross-modal retrieval on the paired test patients (retrieval.py), uncentred and with each modality's mean
    removed; chance beside it."""
    metrics = [f"R@{k}" for k in retrieval.RECALL_AT] + ["median rank"]
    rows, rdata, n = [], [], 0
    for name, f in feats.items():
        x2, x3 = f[PAIRED[0]], f[PAIRED[1]]
        if list(x2["ids"]) != list(x3["ids"]):
            raise ValueError(f"{name}: the paired radiographs and CTs are not the same patients in the same order")
        for centre in (False, True):
            r = retrieval.cross_modal(x2["x"], x3["x"], centre, n_boot, seed)
            n = r["n"]
            for direction in ("2D -> 3D", "3D -> 2D"):
                cells = [fmt_ci(v, ci) if m != "median rank" else f"{v:.0f} ({ci[0]:.0f}-{ci[1]:.0f})"
                         for m, (v, ci) in r[direction].items()]
                rows.append([name, direction, "yes" if centre else "no", *cells])
                rdata.append({"model": name, "direction": direction, "centred": centre, "n": n,
                              **{m: {"value": v, "ci": list(ci)} for m, (v, ci) in r[direction].items()}})
    c = retrieval.chance(n)
    rows.append(["chance", "either", "", *[f"{c[m]:.3f}" if m != "median rank" else f"{c[m]:.0f}" for m in metrics]])
    notes = [f"Each of the {n} radiographs of {titles[PAIRED[0]]} is a query; its own patient's CT in {titles[PAIRED[1]]} "
             "is ranked among all of them by cosine similarity of the frozen backbone embeddings (3D -> 2D: the "
             "reverse). R@k: fraction ranked within the first k; 95% CIs: bootstrap over patients. Centred: each "
             "modality's mean embedding over these test sets removed first (the modality gap is one direction)."]
    return Table("Cross-modal retrieval: a patient's radiograph and CT (beyond the paper)",
                 ["Model", "Query -> gallery", "Modality means removed", *metrics], rows, notes, rdata)


def table_transfer(results: dict, names: list, titles: dict, external: dict) -> Table:
    """Label transfer on the paired patients: each single-modality LP on its own modality and on the other's."""
    rows, rdata, tested = [], [], []
    for name in names:
        for lp, same, cross in (("2D", PAIRED[0], PAIRED[1]), ("3D", PAIRED[1], PAIRED[0])):
            if lp not in results[name]:
                continue
            a, b = results[name][lp][same], results[name][lp][cross]
            rows.append([name, lp, fmt_ci(a.macro, a.macro_ci), fmt_ci(b.macro, b.macro_ci)])
            rdata.append({"model": name, "lp": lp, "same_modality": result_data(a), "other_modality": result_data(b)})
            tested += [(titles[same], a), (titles[cross], b)]
    notes = [f"The same patients both ways: {titles[PAIRED[0]]} and {titles[PAIRED[1]]}. LP 2D and LP 3D are Table 3's "
             "probes (trained on the 2D or the 3D training set only); macro AUROC (95% CI). The paper's Table 3 right "
             "measures the cross-modal drop on different patients (0.58 and 0.53).", *end_notes(names, external, tested)]
    return Table("Cross-modal label transfer on paired patients (beyond the paper)",
                 ["Model", "LP Training Data", "Macro on its own modality", "Macro on the other modality"],
                 rows, notes, rdata)


def table_3(results: dict, names: list, main: str, lps: list, titles: dict, external: dict) -> list:
    """Left: each model with LP ALL (training strategy); right: one model with LP 2D/3D/ALL."""
    cols = ["Test set", "Model", "LP Training Data", "Macro (95% CI)"]
    halves = []
    for title, pairs in (("Table 3 (left): training strategy", [(n, "ALL") for n in names if "ALL" in results[n]]),
                         ("Table 3 (right): modality robustness", [(main, lp) for lp in lps if lp in results[main]])):
        if not pairs:
            continue
        rows, rdata, tested = [], [], []
        for t in [t for t in TEST_SETS if t in titles]:
            for name, lp in pairs:
                if t not in results[name][lp]:
                    continue
                r = results[name][lp][t]
                rows.append([titles[t], name, lp, fmt_ci(r.macro, r.macro_ci)])
                rdata.append(result_data(r, test_set=titles[t], model=name, lp=lp))
                tested.append((titles[t], r))
        halves.append(Table(title, cols, rows, end_notes([n for n, _ in pairs], external, tested), rdata))
    return halves


# ---------------------------------------------------------------- Figure 2a: its numbers (figures.py draws them)

def figure_2a(feats: dict, titles: dict, out: str, seed: int = 0, n_boot: int = 1000) -> dict:
    """Paper 3.4 / Fig. 2a: PCA of the joint 2D+3D training embeddings; a logistic regression on the top
    PCs fitted on 2D-only, 3D-only and joint features, AUROC with its 95% bootstrap CI (patients resampled)
    on each modality's test set, top PCs by |coef|: the CIs say which differences the pattern rests on."""
    joint = features.stack([feats["train_2d"], feats["train_3d"]])
    scaler = StandardScaler().fit(joint["x"])
    pca = PCA(n_components=min(N_PCS, *joint["x"].shape), random_state=seed).fit(scaler.transform(joint["x"]))
    pcs = lambda d: {**d, "x": pca.transform(scaler.transform(d["x"]))}  # noqa: E731
    fits = {"2D": pcs(feats["train_2d"]), "3D": pcs(feats["train_3d"]), "joint": pcs(joint)}
    tests = {t: pcs(feats[t]) for t in ("mimic", "ctrate")}
    report = {"n_components": pca.n_components_, "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
              "test_sets": {t: titles[t] for t in tests}, "labels": {}}
    for j, label in enumerate(data.LABELS):
        report["labels"][label] = per_fit = {}
        for fit_name, d in fits.items():
            k = ~np.isnan(d["y"][:, j])
            probe = fit_label(d["x"][k], d["y"][k, j], d["ids"][k], seed)
            coef = np.zeros(pca.n_components_) if probe is None else probe[-1].coef_[0]
            scored = {t: None if probe is None else evaluate(*_known(td, j, probe), n_boot, seed)
                      for t, td in tests.items()}
            top = np.argsort(-np.abs(coef))[:3]
            per_fit[fit_name] = {"auroc": {t: _clean(np.nan if r is None else float(r.auroc[0])) for t, r in scored.items()},
                                 "ci": {t: _clean([np.nan, np.nan] if r is None else [float(c) for c in r.ci[0]])
                                        for t, r in scored.items()},
                                 "top_pcs": [f"PC{i + 1}" for i in top], "coef": coef.tolist()}
    write_text(os.path.join(out, "fig2a.json"), json.dumps(report, indent=1))
    write_text(os.path.join(out, "fig2a.md"), fig2a_markdown(report))
    figures.plot_figure_2a(report, os.path.join(out, "fig2a.png"))
    return report


def _known(d: dict, j: int, probe) -> tuple:
    """(labels (n, 1), scores (n, 1), ids (n,)) of the test samples that know label j, for evaluate."""
    k = ~np.isnan(d["y"][:, j])
    return d["y"][k, j][:, None], probe.decision_function(d["x"][k])[:, None], d["ids"][k]


def fig2a_markdown(report: dict) -> str:
    tests = report["test_sets"]
    lines = [f"**Figure 2a: logistic regression on the top {report['n_components']} PCs of the joint embeddings**", "",
             "| Label | Fit on | " + " | ".join(f"AUROC {t}" for t in tests.values()) + " | Top PCs (by \\|coef\\|) |",
             "|" + " --- |" * (len(tests) + 3)]
    for label, per_fit in report["labels"].items():
        for fit_name, r in per_fit.items():
            aucs = " | ".join(fmt_ci(r["auroc"][t], r["ci"][t]) for t in tests)
            lines.append(f"| {label} | {fit_name} | {aucs} | {', '.join(r['top_pcs'])} |")
    ratio = ", ".join(f"{v:.3f}" for v in report["explained_variance_ratio"])
    return "\n".join(lines + ["", f"Explained variance ratio: {ratio}", ""])


# ---------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="Linear probes on frozen features: the paper's Tables 1-3 and Figure 2. Two more commands: "
                    "`probe.py embed --ckpt CKPT --out FILE.npz INPUT...` embeds your own images and volumes "
                    "(`probe.py embed --help`); `probe.py curves RUN...` draws training curves from metrics.jsonl.")
    p.add_argument("--ckpt", nargs="+", default=[],
                   help="checkpoint(s), PATH or NAME=PATH (e.g. S1=... S2=... S3=... Supervised=...); unnamed ones "
                        "are named from their training args (S<stage> or Supervised)")
    p.add_argument("--features", nargs="+", default=[], metavar="NAME=DIR",
                   help="another encoder's embeddings, one DATASET_SPLIT.npz per dataset and split in DIR (format: "
                        "features.py's docstring), probed like the checkpoints")
    p.add_argument("--data", nargs="+", default=["phantom"],
                   help="'phantom' (built-in stand-ins) or cache dirs from `python data.py prepare` "
                        "(mimic, chexpert, ctrate, radchest; nih stands in for mimic; default: phantom)")
    p.add_argument("--lp", default="2D,3D,ALL",
                   help="LP training data, comma-separated subset of 2D,3D,ALL (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: next to the first checkpoint, else the "
                                                "first --features folder)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% CIs (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=32768,
                   help="tokens per packed feature batch (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device for the features (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes reading samples (default: 8 on GPU, 0 on CPU)")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "varlen", "flash", "flex"),
                   help="attention backend for feature extraction (default: %(default)s)")
    p.add_argument("--random-init", action="store_true",
                   help="add a row for the first checkpoint's architecture at a random initialisation (seeded by "
                        "--seed): the baseline a trained encoder must beat")
    p.add_argument("--paired-2d", choices=("radiograph", "drr"), default="radiograph",
                   help="phantoms: the paired radiographs of the CT-RATE stand-in's test patients are rendered as "
                        "radiographs (phantom3d-xray) or computed as the DRRs of their CTs (a cache: always DRRs; "
                        "default: %(default)s)")
    p.add_argument("--maps", type=int, default=4, help="Figure 2b: PCA maps per modality (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom data, the held-out split and the bootstrap (default: %(default)s)")
    p.add_argument("--size-2d", type=int, default=None, help="phantom 2D long side (default: the first checkpoint's, else 224, paper 2.4)")
    p.add_argument("--size-3d", type=int, default=None, help="phantom 3D long side (default: the first checkpoint's, else 112, paper 2.4)")
    p.add_argument("--n-train", type=int, default=None, help=f"phantom samples per train split (default: {data.PHANTOM_N['train']})")
    p.add_argument("--n-test", type=int, default=None, help=f"phantom samples per test split (default: {data.PHANTOM_N['test']})")
    args = p.parse_args(argv)
    if not args.ckpt and not args.features:
        p.error("give --ckpt and/or --features")
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if args.device.startswith("cuda") else 0
    args.lp = [m.strip().upper() for m in args.lp.split(",") if m.strip()]
    if not args.lp or any(m not in LP_MODES for m in args.lp):
        p.error(f"--lp must be a comma-separated subset of {','.join(LP_MODES)}, got {args.lp}")
    return args


def probe_results(f: dict, lps: list, n_boot: int, seed: int) -> tuple:
    """One model's features by role -> ({lp: {test set: Result}}, Table 2 Result or None); LPs and test sets
    without features (external features of one modality) are left out."""
    results = {}
    for lp in [lp for lp in lps if all(r in f for r in LP_TRAIN[lp])]:
        probes = fit_probes(**features.stack([f[r] for r in LP_TRAIN[lp]]), seed=seed)
        results[lp] = {t: evaluate(f[t]["y"], probe_scores(probes, f[t]["x"]), f[t]["ids"], n_boot, seed)
                       for t in (*TEST_SETS, "radchest_test", PAIRED[0]) if t in f}
    if "radchest_train" not in f or "radchest_test" not in f:
        return results, None
    probes = fit_probes(**f["radchest_train"], seed=seed)  # paper Table 2: LP retrained on the external train split
    t = f["radchest_test"]
    return results, evaluate(t["y"], probe_scores(probes, t["x"]), t["ids"], n_boot, seed)


def run(args, checkpoints: list, external: dict, sources: dict, datasets: dict) -> dict:
    """Features -> probes -> metrics -> tables and figures; returns the printed Markdown by file stem.

    external: {name: (folder, {role: features})} from --features, probed exactly like the checkpoints."""
    out, device = args.out, torch.device(args.device)
    os.makedirs(out, exist_ok=True)
    titles = {role: src.title for role, src in sources.items()}
    names = [c.name for c in checkpoints] + list(external)
    main = "S3" if "S3" in names else names[0]
    feats = {name: f for name, (_, f) in external.items()}
    for role, ds in datasets.items():  # every checkpoint from one reading of each dataset
        for c, f in zip(checkpoints, features.cached_features(checkpoints, ds, device, args.batch_tokens, args.workers,
                                                     os.path.join(out, "cache"))):
            feats.setdefault(c.name, {})[role] = f
    results, adapted, before, lp_of = {}, {}, {}, {}
    for name in names:
        results[name], adapted_result = probe_results(feats[name], args.lp, args.bootstrap, args.seed)
        # paper Table 1: LP on ALL; external features of one modality: that modality's LP (its "2D" rows)
        lp_of[name] = next(lp for lp in ("ALL", *args.lp) if lp in results[name])
        if adapted_result is not None and "radchest_test" in results[name][lp_of[name]]:  # same test split
            adapted[name], before[name] = adapted_result, results[name][lp_of[name]]["radchest_test"]
    folders = {name: folder for name, (folder, _) in external.items()}
    written = {"table1": write_tables(out, "table1", [table_1(results, names, lp_of, titles, folders)])}
    if adapted:
        t2 = table_2(adapted, before, titles["radchest_train"], titles["radchest_test"], folders)
        written["table2"] = write_tables(out, "table2", [t2])
    written["table3"] = write_tables(out, "table3", table_3(results, names, main, args.lp, titles, folders))
    paired = [n for n in names if all(r in feats[n] for r in PAIRED)]
    if paired:
        written["retrieval"] = write_tables(out, "retrieval", [
            table_retrieval({n: feats[n] for n in paired}, titles, args.bootstrap, args.seed),
            table_transfer(results, paired, titles, folders)])
    if all(r in feats[main] for r in ("train_2d", "train_3d", "mimic", "ctrate")):
        figure_2a(feats[main], titles, out, args.seed, args.bootstrap)
    maps = {m: datasets[r] for m, r in (("2d", "mimic"), ("3d", "ctrate")) if r in datasets}
    # Figure 2b needs patch tokens: the main model if it is a checkpoint, else the first checkpoint
    mapped = next((c for c in checkpoints if c.name == main), checkpoints[0] if checkpoints else None)
    if maps and args.maps > 0 and mapped is not None:
        figures.figure_2b(mapped.model, maps, args.maps, out, device, mapped.name)
    # training curves of the checkpoints whose run folder holds its metrics.jsonl
    logs = {c.name: os.path.join(os.path.dirname(c.path), "metrics.jsonl") for c in checkpoints if c.path}
    figures.figure_curves({n: p for n, p in logs.items() if os.path.exists(p)}, os.path.join(out, "curves.png"))
    return written


def curves(argv) -> list:
    """`probe.py curves`: the training-curves figure of runs named on the command line."""
    p = argparse.ArgumentParser(
        prog="probe.py curves",
        description="Training curves of one or more runs from their metrics.jsonl (needs matplotlib): loss, "
                    "prediction loss, SIGReg and the embedding-health figures the run logged.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train.py --out) or metrics.jsonl files, "
                                                          "PATH or NAME=PATH")
    p.add_argument("--out", default="curves.png", help="figure to write (default: %(default)s)")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, path = features.named(item)
        name = name or os.path.basename(os.path.normpath(path))
        path = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no metrics.jsonl (train.py writes one into its --out)")
        runs[name] = path
    if figures.matplotlib_figure() is None:
        raise ValueError("matplotlib is not installed (optional): pip install matplotlib")
    drawn = figures.figure_curves(runs, args.out)
    if not drawn:
        raise ValueError(f"{', '.join(runs.values())}: no logged step to draw")
    print(f"wrote {args.out}: {', '.join(drawn)}")
    return drawn


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["embed"], ["curves"]):
        try:
            features.embed(features.embed_args(argv[1:])) if argv[0] == "embed" else curves(argv[1:])
        except (FileNotFoundError, ValueError) as e:  # the last line: a reader worker's error comes with its traceback
            print(f"probe.py {argv[0]}: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
            return 2
        return 0
    args = get_args(argv)
    try:  # user errors (bad checkpoint, bad --data, bad --features) print one clear line, no traceback
        checkpoints = features.load_checkpoints(args.ckpt, args.attn)
        if args.random_init:
            if not checkpoints:
                raise ValueError("--random-init needs a --ckpt: it probes that architecture at a random initialisation")
            baseline = features.random_init(checkpoints[0], args.attn, args.seed)
            if baseline.name in {c.name for c in checkpoints}:  # as load_checkpoints names a repeated name
                baseline.name = f"{baseline.name}#{len(checkpoints) + 1}"
            checkpoints.append(baseline)
        if args.data == ["phantom"] and checkpoints:  # phantoms at the size the (first) model was trained on
            features.train_sizes(args, checkpoints[0].train_args)
        sources = resolve_sources(args.data, args.lp)
        if args.paired_2d == "drr" and args.data == ["phantom"]:
            sources = paired_drrs(sources)
        datasets = open_datasets(sources, args)
        external = load_external(args.features, datasets, {c.name for c in checkpoints}, args.lp)
    except (FileNotFoundError, ValueError) as e:
        print(f"probe.py: error: {e}", file=sys.stderr)
        return 2
    first = os.path.dirname(os.path.abspath(checkpoints[0].path)) if checkpoints else next(iter(external.values()))[0]
    args.out = args.out or first
    written = run(args, checkpoints, external, sources, datasets)
    for md in written.values():
        print(md)
    print(f"wrote tables, figures{' and the feature cache' if checkpoints else ''} to {args.out}")
    if figures.matplotlib_figure() is None:
        print("matplotlib is not installed (optional): fig2a.png and curves.png not drawn, fig2b_*.png without "
              "titles and labels (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
