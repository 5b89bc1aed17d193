import csv
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

import data
import figures
import features
import probe
from model import SparseMedicalViT, backbone_from_checkpoint, load_checkpoint
from pack import pack
import readers
import views

P = 14
# small phantoms: 2D about 56 x 42 pixels (12 tokens), 3D 14-28 x 28 x 28 voxels (4-8 tokens)
PHANTOM = ["--size-2d", "56", "--size-3d", "28", "--n-train", "128", "--n-test", "64"]
COLUMNS_1 = ["Test set", "Model", "LP Training Data", "ATEL", "CARD", "CONS", "LO", "EFF", "Macro (95% CI)"]
TEST_SETS = ["MIMIC (phantom2d test)", "CheXpert (phantom2d-ext test)", "CT-RATE (phantom3d test)",
             "RAD-ChestCT (phantom3d-ext test)"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return SparseMedicalViT(dim=32, depth=1, heads=2, attn="sdpa")


def save(model, path, **args):
    torch.save({"format": 1, "model_config": model.config, "model": model.state_dict(), "args": args}, path)
    return str(path)


def briefly_trained(seed=0, steps=150):
    """A tiny backbone trained with a supervised linear head on the phantom train splits (full batch, a few s)."""
    records = [ds[i] for name, size in (("phantom2d", 56), ("phantom3d", 28))
               for ds in [data.open_dataset(name, "train", n=256, size=size)] for i in range(len(ds))]
    packed = pack([views.whole_view(r, P) for r in records], P)
    y = torch.tensor(np.stack([r.labels for r in records]))
    known = ~torch.isnan(y)
    model, head = tiny(seed).train(), torch.nn.Linear(32, len(data.LABELS))
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(head(model(packed))[known], y[known])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run on small phantoms with a briefly trained (S3) and a random-init checkpoint."""
    root = tmp_path_factory.mktemp("probe")
    trained = save(briefly_trained(), root / "trained.pt", stage=3, objective="supervised")
    random = save(tiny(seed=1), root / "random.pt", stage=3, objective="lejepa")
    out = root / "out"
    argv = ["--ckpt", f"S3={trained}", f"Random={random}", "--out", str(out), "--bootstrap", "200", "--maps", "2",
            "--device", "cpu", *PHANTOM]
    assert probe.main(argv) == 0
    return dict(root=root, out=out, trained=trained, random=random, argv=argv)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def count_embedded(monkeypatch) -> list:
    """Count the samples the backbone embeds (model.forward), as a one-element list."""
    seen = [0]
    forward = SparseMedicalViT.forward

    def counting(self, packed):
        seen[0] += packed.n_views
        return forward(self, packed)

    monkeypatch.setattr(SparseMedicalViT, "forward", counting)
    return seen


# ---------------------------------------------------------------- metrics

def test_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 500):
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = np.round(rng.normal(size=n) + y, 1)  # rounding makes many ties
        assert probe.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert probe.auroc(np.array([0, 1, 0, 1]), np.array([1.0, 1.0, 1.0, 1.0])) == 0.5  # all tied


def test_weighted_auroc_equals_auroc_of_the_resample():
    """A bootstrap resample as integer weights gives the AUROC of the explicitly repeated samples."""
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 40), np.round(rng.normal(size=40), 1)
    w = rng.multinomial(40, np.full(40, 1 / 40), size=5).astype(float)  # (5, 40)
    fast = probe.weighted_auroc(y, s, w)
    for b in range(5):
        idx = np.repeat(np.arange(40), w[b].astype(int))
        assert fast[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_single_class_label_is_na_not_a_crash():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (60, 5)).astype(np.float32)
    y[:, 1] = 0  # Cardiomegaly: no positive in this test set
    y[:10, 3] = np.nan  # unknown labels are skipped
    s = y + rng.normal(size=y.shape)
    r = probe.evaluate(y, s, np.arange(60).astype(str), n_boot=50)
    assert np.isnan(r.auroc[1]) and np.isnan(r.ci[1]).all()
    assert r.macro == pytest.approx(np.mean([r.auroc[j] for j in (0, 2, 3, 4)]))
    cells = probe.result_cells(r)
    assert cells[1] == "n/a" and "n/a" not in cells[-1]
    # a label with one class in the LP training data: no probe, n/a, no crash
    x = rng.normal(size=(60, 8))
    probes = probe.fit_probes(x, y, np.arange(60).astype(str))
    scores = probe.probe_scores(probes, x)
    assert probes[1] is None and np.isnan(scores[:, 1]).all()
    assert np.isnan(probe.auroc(np.zeros(5), np.arange(5.0)))
    # and evaluating those scores, or a test label unknown everywhere, gives n/a too
    y_test = rng.integers(0, 2, (60, 5)).astype(np.float32)
    y_test[:, 4] = np.nan
    r = probe.evaluate(y_test, scores, np.arange(60).astype(str), n_boot=50)
    assert np.isnan(r.auroc[1]) and np.isnan(r.auroc[4]) and np.isfinite(r.macro)
    assert np.isnan(probe.auroc(np.zeros(0), np.zeros(0)))


def table_1_of(r, title="MIMIC"):
    return probe.table_1({"S3": {"ALL": {"mimic": r}}}, ["S3"], {"S3": "ALL"}, {"mimic": title}, {})


def separable(n_pos=(20, 20, 20, 20, 20), n=60):
    """Test labels (n, 5) with n_pos[j] positives of label j, and scores that rank them perfectly."""
    y = np.zeros((n, 5), np.float32)
    for j, k in enumerate(n_pos):
        y[:k, j] = 1
    return y, y + 0.1 * np.arange(n)[:, None] / n, np.arange(n).astype(str)


def test_na_footnote_only_under_a_table_with_an_na_cell():
    y, s, ids = separable()
    r = probe.evaluate(y, s, ids, n_boot=0)
    s[:, 0] = np.nan  # no probe for ATEL (one class in the LP training data)
    na = probe.evaluate(y, s, ids, n_boot=0)
    tables = {"clean": table_1_of(r), "na": table_1_of(na)}
    assert probe.NA_NOTE not in tables["clean"].notes and probe.NA_NOTE in tables["na"].notes
    assert "n/a" not in probe.to_markdown(tables["clean"]) and "| n/a |" in probe.to_markdown(tables["na"])


def test_a_label_with_few_positives_is_shown_flagged_and_left_out_of_macro():
    """CARD with 3 positives: its AUROC shown with the mark, n+ 3 in the table and the note, and the macro and its
    CI exactly those of the same test set without CARD labels at all."""
    y, s, ids = separable((20, 3, 20, 20, 20))
    s += np.random.default_rng(0).normal(size=s.shape)  # imperfect: CIs of some width
    r = probe.evaluate(y, s, ids, n_boot=200)
    without = y.copy()
    without[:, 1] = np.nan
    ref = probe.evaluate(without, s, ids, n_boot=200)
    assert r.n_pos == [20, 3, 20, 20, 20] and r.in_macro == [True, False, True, True, True]
    assert np.isfinite(r.auroc[1]) and r.auroc[1] != r.macro
    assert r.macro == ref.macro and r.macro_ci == ref.macro_ci
    assert r.auroc[0] == ref.auroc[0] and np.isfinite(r.ci[1]).all()
    t = table_1_of(r)
    md = probe.to_markdown(t)
    assert f"| {probe.fmt(r.auroc[1])}{probe.FEW} |" in md and md.count(probe.FEW) == 2  # the cell and its note
    assert "| n+ (of 60) |  | 20 | 3 | 20 | 20 | 20 |  |" in md
    assert any(n.startswith(probe.FEW) and "fewer than 10 positives" in n and "MIMIC: CARD (n+ 3)" in n
               for n in t.notes)
    assert t.data[0]["n_pos"] == r.n_pos and t.data[0]["in_macro"] == r.in_macro  # table1.json says it too
    assert not any(probe.FEW in n for n in table_1_of(ref).notes)  # n/a is not "too few"


def test_a_label_the_dataset_does_not_have_is_named_not_one_class():
    """NIH has no Lung Opacity (unknown in every test sample): the note says so; one class in the test set is
    another note."""
    y, s, ids = separable()
    nih = y.copy()
    nih[:, 3] = np.nan  # as readers.NIH_COLUMNS leaves it
    absent = table_1_of(probe.evaluate(nih, s, ids, n_boot=0), "NIH ChestX-ray14 (internal test set)")
    one_class = y.copy()
    one_class[:, 3] = 0
    single = table_1_of(probe.evaluate(one_class, s, ids, n_boot=0))
    assert "NIH ChestX-ray14 (internal test set) has no Lung Opacity label" in " ".join(absent.notes)
    assert probe.NA_NOTE not in absent.notes and probe.NA_NOTE in single.notes
    assert not any("has no" in n for n in single.notes)
    assert absent.rows[0][6] == "n/a" and single.rows[0][6] == "0"  # n+ of LO


def test_bootstrap_ci_contains_estimate_and_narrows_as_n_grows():
    rng = np.random.default_rng(3)
    widths = []
    for n in (60, 2000):
        y = rng.integers(0, 2, (n, 5)).astype(np.float32)
        s = y + 1.5 * rng.normal(size=y.shape)
        r = probe.evaluate(y, s, np.arange(n).astype(str), n_boot=300, seed=0)
        assert r.macro_ci[0] < r.macro < r.macro_ci[1]
        assert all(lo < a < hi for a, (lo, hi) in zip(r.auroc, r.ci))
        widths.append(r.macro_ci[1] - r.macro_ci[0])
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 5.8x narrower in theory
    again = probe.evaluate(y, s, np.arange(n).astype(str), n_boot=300, seed=0)
    assert again.macro_ci == r.macro_ci  # fixed seed: reproducible


def test_bootstrap_resamples_patients_not_images():
    """Four studies per patient ('patient/study' ids): resampling patients gives a wider CI than resampling studies."""
    rng = np.random.default_rng(4)
    y = np.repeat(rng.integers(0, 2, (100, 5)), 4, axis=0).astype(np.float32)
    s = np.repeat(rng.normal(size=(100, 5)), 4, axis=0) + y
    by_patient = probe.evaluate(y, s, np.array([f"p{i // 4}/s{i}" for i in range(400)]), n_boot=300)
    by_image = probe.evaluate(y, s, np.array([f"p{i}/s{i}" for i in range(400)]), n_boot=300)
    width = lambda r: r.macro_ci[1] - r.macro_ci[0]  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)


def test_held_out_part_is_patient_disjoint():
    ids = np.array([f"p{i // 3}/s{i}" for i in range(150)])  # three studies per patient
    held = probe.patient_holdout(ids, 0.2, seed=0)
    who = probe.patients(ids)
    assert set(who[held]).isdisjoint(who[~held]) and held.sum() == 30


def test_real_nih_tables_count_positives_and_say_nih_has_no_lung_opacity(tmp_path):
    """The NIH ChestX-ray14 sample as the 2D test set: n+ counted from its labels, Lung Opacity n/a because NIH
    has no such label (not "one class"), and the macro over the four labels it has."""
    from test_data import real
    cache = tmp_path / "nih"
    data.prepare("nih", real("nih-cxr14-sample"), cache, readers.Options(size=56))
    ckpt = save(tiny(seed=3).eval(), tmp_path / "m.pt", stage=3, size_2d=56, size_3d=28)
    assert probe.main(["--ckpt", ckpt, "--data", str(cache), "--lp", "2D", "--bootstrap", "20", "--maps", "0",
                       "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    (table,) = read_json(tmp_path / "out" / "table1.json")
    y = data.open_dataset(cache, "test").labels
    counts = [str(int(k)) for k in np.nansum(y, axis=0)]
    assert table["rows"][0][1:] == ["n+ (of 198)", "", *counts[:3], "n/a", counts[4], ""]
    assert "NIH ChestX-ray14 (internal test set) has no Lung Opacity label" in " ".join(table["notes"])
    assert probe.NA_NOTE not in table["notes"]
    d = table["data"][0]
    assert d["n_known"][3] == 0 and d["in_macro"] == [True, True, True, False, True]
    assert d["macro"] == pytest.approx(np.mean([d["auroc"][j] for j in (0, 1, 2, 4)]))


# ---------------------------------------------------------------- features

def test_features_do_not_depend_on_token_budget():
    """Packed batches under any token budget, read by worker processes or not, equal one view at a time."""
    model = tiny().eval()
    ds = data.open_dataset("phantom3d", "test", n=6, size=28)
    small = features.extract_features(model, ds, batch_tokens=10)
    big = features.extract_features(model, ds, batch_tokens=10_000, workers=2)
    with torch.no_grad():
        alone = np.concatenate([model(pack([views.whole_view(ds[i], P)], P)).numpy() for i in range(len(ds))])
    assert np.allclose(small["x"], alone, atol=1e-5) and np.allclose(big["x"], alone, atol=1e-5)
    assert list(small["ids"]) == list(big["ids"]) == ds.ids and np.array_equal(small["y"], ds.labels, equal_nan=True)
    sizes = [len(v) for v, _ in features.whole_views(ds, P, 10)]
    assert max(sizes) <= 2 and sum(sizes) == len(ds)  # 4-8 tokens per volume, 10 per batch


def test_checkpoints_without_cached_features_share_one_reading_of_each_dataset(tmp_path, monkeypatch):
    """Two uncached checkpoints: every record rendered once, and each model's features as if it were alone."""
    ds = data.open_dataset("phantom2d", "test", n=10, size=56)
    reads = [0]
    getitem = type(ds).__getitem__

    def counting(self, i):
        reads[0] += 1
        return getitem(self, i)

    checkpoints = [features.Checkpoint(f"m{s}", "", tiny(seed=s).eval(), f"key{s}", {}) for s in (0, 1)]
    alone = [features.extract_features(c.model, ds, 32768)["x"] for c in checkpoints]
    monkeypatch.setattr(type(ds), "__getitem__", counting)
    got = features.cached_features(checkpoints, ds, torch.device("cpu"), 32768, 0, str(tmp_path))
    assert reads[0] == len(ds)  # once for both, not once per checkpoint
    assert all(np.array_equal(f["x"], a) for f, a in zip(got, alone)) and not np.allclose(alone[0], alone[1])
    assert len(list(tmp_path.glob("*.npz"))) == 2
    again = features.cached_features(checkpoints, ds, torch.device("cpu"), 32768, 0, str(tmp_path))
    assert reads[0] == len(ds) and all(np.array_equal(f["x"], a) for f, a in zip(again, alone))  # from the cache


def test_feature_cache_reused_and_changed_checkpoint_recomputes(run, tmp_path, monkeypatch):
    # copies of the checkpoints and the cache: the key is the checkpoint's content, not its path
    for name in ("trained.pt", "random.pt"):
        shutil.copy(run["root"] / name, tmp_path / name)
    shutil.copytree(run["out"] / "cache", tmp_path / "cache")
    argv = ["--ckpt", f"S3={tmp_path / 'trained.pt'}", f"Random={tmp_path / 'random.pt'}", "--bootstrap", "200",
            "--maps", "2", "--device", "cpu", *PHANTOM]  # no --out: next to the first checkpoint
    seen = count_embedded(monkeypatch)
    assert probe.main(argv) == 0
    assert seen[0] == 0  # every feature came from the cache
    assert (tmp_path / "table1.md").read_text() == (run["out"] / "table1.md").read_text()

    save(tiny(seed=7), tmp_path / "random.pt", stage=3)  # a changed checkpoint
    assert probe.main(argv) == 0
    assert seen[0] == 3 * 128 + 5 * 64  # its 8 splits (the paired radiographs too) recomputed, the unchanged S3 cached
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3 * 8
    assert not list((tmp_path / "cache").glob("*.tmp"))


# ---------------------------------------------------------------- tables and figures

def test_trained_checkpoint_beats_random_init(run):
    rows = read_json(run["out"] / "table1.json")[0]["data"]
    macro = {name: np.mean([r["macro"] for r in rows if r["model"] == name]) for name in ("S3", "Random")}
    assert macro["S3"] > macro["Random"] + 0.08, macro


def test_random_init_row_is_the_first_checkpoints_architecture_at_its_seeded_init(run, tmp_path, capsys):
    """--random-init builds its row itself: the same numbers as a saved checkpoint of that init (tiny(seed=1))."""
    argv = ["--ckpt", f"S3={run['trained']}", f"Random={run['random']}", "--random-init", "--seed", "1",
            "--out", str(tmp_path), "--bootstrap", "50", "--maps", "0", "--device", "cpu", *PHANTOM]
    assert probe.main(argv) == 0
    rows = {(t, lp): v for (t, name, lp), v in macro_rows(tmp_path).items() if name == "Random init"}
    assert rows and rows == {(t, lp): v for (t, name, lp), v in macro_rows(tmp_path).items() if name == "Random"}
    assert probe.main(["--random-init", "--features", f"X={tmp_path}", *PHANTOM]) == 2  # no architecture to copy
    assert "--random-init needs a --ckpt" in capsys.readouterr().err


def test_tables_have_the_papers_rows_and_columns(run):
    out = run["out"]
    with open(out / "table1.csv") as f:
        t1 = list(csv.reader(f))
    assert t1[0] == COLUMNS_1
    counts, t1 = [r for r in t1[1:] if r[1].startswith("n+")], [r for r in t1[1:] if not r[1].startswith("n+")]
    assert [(r[0], r[1], r[2]) for r in t1] == [(t, m, "ALL") for t in TEST_SETS for m in ("S3", "Random")]
    assert all(r[-1].count("(") == 1 and r[-1].endswith(")") for r in t1)  # "0.812 (0.754-0.866)"
    md = (out / "table1.md").read_text()
    assert "| Model | LP Training Data | ATEL | CARD | CONS | LO | EFF | Macro (95% CI) |" in md
    assert all(f"| **{t}** |" in md for t in TEST_SETS)
    # each test set's positives per label, counted from its labels; a label with fewer than 10 is marked
    rows, datasets = read_json(out / "table1.json")[0]["data"], role_datasets(run["argv"])
    for t, role in zip(TEST_SETS, probe.TEST_SETS):
        y = datasets[role].labels
        assert [r[3:8] for r in counts if r[0] == t] == [[str(int(k)) for k in np.nansum(y, axis=0)]]
        for r in [r for r in t1 if r[0] == t]:
            assert [c.endswith(probe.FEW) for c in r[3:8]] == [0 < k < 10 for k in np.nansum(y, axis=0)]
    assert any(c.endswith(probe.FEW) for r in t1 for c in r)  # 64 test samples: CONS has fewer than 10
    for d in rows:  # Macro: the labels with enough positives only
        assert d["macro"] == pytest.approx(np.mean([a for a, used in zip(d["auroc"], d["in_macro"]) if used]))
    assert ("fewer than 10 positives" in md) == any(probe.FEW in c for r in t1 for c in r)
    assert (probe.NA_NOTE in md) == any("n/a" in cell for r in t1 for cell in r)  # footnote iff n/a

    with open(out / "table2.csv") as f:
        t2 = list(csv.reader(f))
    assert t2[0] == ["Model", "Label", "n+", "AUROC (95% CI)", "Improvement (AUROC points x 100)",
                     "AUROC before adaptation"]
    assert [r[1] for r in t2[1:7]] == ["ATEL", "CARD", "CONS", "LO", "EFF", "Macro"]
    y = datasets["radchest_test"].labels
    assert [r[2] for r in t2[1:6]] == [str(int(k)) for k in np.nansum(y, axis=0)]
    before = read_json(out / "table1.json")[0]["data"]
    s3_rad = next(r for r in before if r["model"] == "S3" and r["test_set"].startswith("RAD-ChestCT"))
    after = read_json(out / "table2.json")[0]["data"][0]
    assert after["before"]["macro"] == s3_rad["macro"]
    gain = 100 * (after["adapted"]["macro"] - s3_rad["macro"])  # AUROC points x 100, as the paper's 9.12
    assert t2[6][4] == f"{gain:.2f}"

    with open(out / "table3.csv") as f:
        t3 = list(csv.reader(f))
    assert t3[0] == ["Analysis", "Test set", "Model", "LP Training Data", "Macro (95% CI)"]
    left = [r[1:4] for r in t3[1:] if "left" in r[0]]
    right = [r[1:4] for r in t3[1:] if "right" in r[0]]
    assert left == [[t, m, "ALL"] for t in TEST_SETS for m in ("S3", "Random")]
    assert right == [[t, "S3", lp] for t in TEST_SETS for lp in ("2D", "3D", "ALL")]
    s3_all = {r[1]: r[4] for r in t3[1:] if "right" in r[0] and r[3] == "ALL"}
    assert s3_all == {r[0]: r[-1] for r in t1 if r[1] == "S3"}  # the same probe as Table 1


def test_figure_2a_reports_each_fit_on_each_modality(run):
    fig = read_json(run["out"] / "fig2a.json")
    assert fig["n_components"] == probe.N_PCS and len(fig["explained_variance_ratio"]) == probe.N_PCS
    card = fig["labels"]["Cardiomegaly"]
    assert set(card) == {"2D", "3D", "joint"}
    for fit in card.values():
        assert set(fit["auroc"]) == {"mimic", "ctrate"} and all(0 <= a <= 1 for a in fit["auroc"].values())
        assert set(fit["ci"]) == set(fit["auroc"]) and all(0 <= lo < hi <= 1 for lo, hi in fit["ci"].values())
        assert len(fit["top_pcs"]) == 3 and np.argmax(np.abs(fit["coef"])) + 1 == int(fit["top_pcs"][0][2:])
    assert re.search(r"\| Cardiomegaly \| joint \| [0-9.]+ \([0-9.]+-[0-9.]+\) \|", (run["out"] / "fig2a.md").read_text())


def no_matplotlib(monkeypatch):
    """Make `import matplotlib` fail, as on a machine without it (it is optional)."""
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def map_sets():
    return {"2d": data.open_dataset("phantom2d", "test", n=8, size=56), "3d": data.open_dataset("phantom3d", "test", n=8, size=28)}


def test_figure_2b_without_matplotlib_is_input_and_pca_map_side_by_side(tmp_path, monkeypatch, map_sets):
    no_matplotlib(monkeypatch)
    entries = figures.figure_2b(tiny(seed=2).eval(), map_sets, 2, str(tmp_path), torch.device("cpu"))
    assert entries == read_json(tmp_path / "fig2b.json")
    assert sorted(e["file"] for e in entries) == ["fig2b_2d_0.png", "fig2b_2d_1.png", "fig2b_3d_0.png", "fig2b_3d_1.png"]
    for e in entries:
        view = views.whole_view(map_sets[e["dataset"][-2:]][e["index"]], P)[0]
        z, h, w = view.shape
        with Image.open(tmp_path / e["file"]) as im:
            im.verify()
        img = np.asarray(Image.open(tmp_path / e["file"]))
        assert img.shape == (h, 2 * w, 3)  # input | PCA map, each at the input size
        gray = np.clip((view[z // 2].numpy() + 1) * 127.5, 0, 255).astype(np.uint8)  # the (middle) slice
        assert np.array_equal(img[:, :w, 0], gray)
        assert ("slice" in e) == (z > 1) and (z == 1 or e["slice"]["index"] == z // 2 and e["slice"]["of"] == z)
        fmap = img[:, w:].reshape(h // P, P, w // P, P, 3)
        assert (fmap == fmap[:, :1, :, :1]).all()  # constant within each patch: nearest upsampling
        assert (fmap.min((0, 1, 2, 3)) == 0).all() and (fmap.max((0, 1, 2, 3)) == 255).all()  # each channel's range


def test_figures_with_matplotlib_are_titled_panels(tmp_path, map_sets):
    pytest.importorskip("matplotlib")
    entries = figures.figure_2b(tiny(seed=2).eval(), map_sets, 1, str(tmp_path), torch.device("cpu"), "S3")
    for e in entries:
        with Image.open(tmp_path / e["file"]) as im:
            assert im.size == (1300, 540)  # three panels, not the input's 56 x 42
    fits = {f: {"auroc": {"mimic": 0.7, "ctrate": None if f == "2D" else 0.6}, "coef": [0.5, -1.0, 0.2]}
            for f in ("2D", "3D", "joint")}  # None: a fit without a probe (one class), drawn as a gap
    report = {"n_components": 3, "explained_variance_ratio": [0.9, 0.08, 0.02], "labels": {"Cardiomegaly": fits},
              "test_sets": {"mimic": "MIMIC (phantom2d test)", "ctrate": "CT-RATE (phantom3d test)"}}
    assert figures.plot_figure_2a(report, str(tmp_path / "fig2a.png"))
    with Image.open(tmp_path / "fig2a.png") as im:
        assert im.size == (1600, 500)


def write_metrics(path, keys, steps=5):
    rows = [{"step": s, **{k: 1.0 / s for k in keys}} for s in range(1, steps + 1)]
    rows.insert(2, {"step": 3, "skipped": "non-finite"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # a line cut short by a crash
    return str(path)


def test_training_curves_plot_the_keys_a_log_has(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    old = write_metrics(tmp_path / "old.jsonl", ["loss", "pred", "sigreg", "lr"])
    new = write_metrics(tmp_path / "new.jsonl", ["loss", "pred", "sigreg", "rank_emb", "rank_proj", "std_emb",
                                                 "probe_auroc"])
    assert len(figures.read_metrics(old)) == 5
    assert figures.figure_curves({"S1": old}, str(tmp_path / "a.png")) == [t for t, _ in figures.CURVES[:3]]
    assert figures.figure_curves({"S1": old, "S3": new}, str(tmp_path / "b.png")) == [
        t for t, _ in figures.CURVES[:5]] + [figures.CURVES[6][0]]
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()
    assert probe.main(["curves", f"S1={old}", str(tmp_path), "--out", str(tmp_path / "cli.png")]) == 2  # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text(Path(new).read_text())
    assert probe.curves([f"S1={old}", str(tmp_path), "--out", str(tmp_path / "cli.png")]) == figures.figure_curves(
        {"S1": old, "S3": new}, str(tmp_path / "b.png"))  # a run folder: its metrics.jsonl
    assert (tmp_path / "cli.png").exists()
    no_matplotlib(monkeypatch)
    assert figures.figure_curves({"S1": old}, str(tmp_path / "c.png")) == [] and not (tmp_path / "c.png").exists()
    assert not figures.plot_figure_2a({}, str(tmp_path / "d.png")) and not (tmp_path / "d.png").exists()


# ---------------------------------------------------------------- bad input

def test_bad_checkpoints_give_one_clear_line(run, tmp_path, capsys):
    good = open(run["random"], "rb").read()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save({**torch.load(run["random"], weights_only=True), "format": 99}, tmp_path / "old.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases = {"missing.pt": "not found", "truncated.pt": "not a readable checkpoint", "old.pt": "format 99",
             "other.pt": "not a MultiMedVision checkpoint", "text.pt": "not a readable checkpoint"}
    for name, says in cases.items():
        assert probe.main(["--ckpt", str(tmp_path / name), *PHANTOM]) == 2
        err = capsys.readouterr().err
        assert says in err and name in err and "Traceback" not in err and err.count("\n") == 1
        assert "weights_only" not in err  # never torch's advice to unpickle an untrusted file
    assert probe.main(["--ckpt", run["random"], "--data", str(tmp_path / "no_cache"), *PHANTOM]) == 2
    assert "no_cache" in capsys.readouterr().err


def test_checkpoint_names(run):
    named, unnamed = features.load_checkpoints([f"Stage one={run['random']}", run["trained"]], "sdpa")
    assert (named.name, unnamed.name) == ("Stage one", "Supervised")
    assert named.key != unnamed.key


# ---------------------------------------------------------------- external features (--features)

def role_datasets(argv):
    """The datasets a probe.py run with these phantom arguments opens, by role."""
    args = probe.get_args(argv)
    return probe.open_datasets(probe.resolve_sources(args.data, args.lp), args)


def write_features_dir(folder, model, datasets, roles=None, seed=0):
    """Our features in the --features layout, rows shuffled and with an id the probe must ignore."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for role, ds in datasets.items():
        if roles is None or role in roles:
            f = features.extract_features(model, ds, batch_tokens=32768)
            order = rng.permutation(len(f["ids"]))
            extra = {"ids": np.r_[f["ids"][order], ["not-in-the-split"]], "x": np.r_[f["x"][order], f["x"][:1]]}
            features.write_embeddings(features.features_path(str(folder), ds), extra)
    return str(folder)


def macro_rows(out, table="table1"):
    return {(r["test_set"], r["model"], r["lp"]): (r["auroc"], r["ci"], r["macro"], r["macro_ci"])
            for t in read_json(out / f"{table}.json") for r in t["data"]}


def test_features_of_one_modality_give_its_rows_with_its_lp(run, tmp_path):
    """A 2D-only encoder (the paper's BiomedCLIP rows): LP 2D, the 2D test sets only."""
    model, _ = backbone_from_checkpoint(run["trained"], attn="sdpa")
    folder = write_features_dir(tmp_path / "feats", model, role_datasets(run["argv"]), roles=("train_2d", "mimic", "chexpert"))
    out = tmp_path / "out"
    assert probe.main(["--features", f"Ext2D={folder}", "--out", str(out), "--bootstrap", "50", "--device", "cpu",
                       *PHANTOM]) == 0
    assert sorted(macro_rows(out)) == [(t, "Ext2D", "2D") for t in sorted(TEST_SETS[:2])]
    assert not (out / "table2.md").exists() and not list(out.glob("fig2b*"))


def test_bad_features_files_give_one_clear_line(run, tmp_path, capsys):
    datasets = role_datasets(run["argv"])
    ds = datasets["mimic"]
    n, good_ids = len(ds), np.array(ds.ids)
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    cases = {  # what mimic's file holds -> what the error says
        "missing id": (dict(ids=good_ids[1:], x=x[1:]), f"1 of the {n} ids"),
        "duplicate": (dict(ids=np.r_[good_ids, good_ids[:1]], x=np.r_[x, x[:1]]), "appears 2 times"),
        "non-finite": (dict(ids=good_ids, x=nan_x), f"non-finite values in 1 row(s), e.g. id '{good_ids[3]}'"),
        "wrong width": (dict(ids=good_ids, x=x[:, :5]), "width 5, but"),
        "no x": (dict(ids=good_ids), "no 'x' array"),
        "shapes": (dict(ids=good_ids, x=x[:-1]), "should be (N,) and (N, D)"),
    }
    for case, (content, says) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        for role, d in datasets.items():
            if role != "mimic":
                features.write_embeddings(features.features_path(str(folder), d),
                                       {"ids": np.array(d.ids), "x": np.zeros((len(d), 8), np.float32)})
        path = features.features_path(str(folder), ds)
        data.atomic_write(path, lambda f: np.savez(f, **content))
        assert probe.main(["--features", f"E={folder}", "--device", "cpu", *PHANTOM]) == 2, case
        err = capsys.readouterr().err
        assert says in err and path in err and err.count("\n") == 1 and "Traceback" not in err, (case, err)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "phantom2d_train.npz").write_text("not an archive")
    assert probe.main(["--features", f"E={tmp_path / 'text'}", "--device", "cpu", *PHANTOM]) == 2
    assert "phantom2d_train.npz: not a readable .npz file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert probe.main(["--features", f"E={tmp_path / 'empty'}", "--device", "cpu", *PHANTOM]) == 2
    assert "no LP training features for --features E" in capsys.readouterr().err


def test_features_recipe_writes_files_that_features_reads(tmp_path, monkeypatch):
    """features.py's recipe for another encoder, run as written (my_encoder: a fixed random projection of the
    pixels) on a prepared phantom cache; probe.py --features reads what it wrote."""
    recipe = textwrap.dedent(re.search(r"exactly the probe's images and ids:\n\n(.*?)\n\n", features.__doc__, re.S).group(1))
    data.prepare("phantom", "", tmp_path / "cache" / "mimic", readers.Options(phantom="phantom2d", n=64, size=56))
    monkeypatch.chdir(tmp_path)
    weights = np.random.default_rng(0).normal(size=(56 * 56, 8))
    my_encoder = lambda image: np.resize(image, (56 * 56,)) @ weights  # noqa: E731
    exec(compile(recipe, "features.py recipe", "exec"), {"data": data, "features": features, "np": np, "my_encoder": my_encoder})
    assert sorted(os.listdir(tmp_path / "feats" / "mine")) == ["phantom2d_test.npz", "phantom2d_train.npz"]
    out = tmp_path / "out"
    assert probe.main(["--features", f"Mine={tmp_path / 'feats' / 'mine'}", "--lp", "2D", "--n-train", "64", "--n-test",
                       "16", "--bootstrap", "20", "--out", str(out), "--device", "cpu"]) == 0
    assert list(macro_rows(out)) == [("MIMIC (phantom2d test)", "Mine", "2D")]


# ---------------------------------------------------------------- probe.py embed

def write_inputs(folder):
    """A grayscale PNG, an RGB JPEG in a subfolder and an anisotropic NIfTI CT volume (HU)."""
    import nibabel as nib
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray((rng.random((90, 70)) * 255).astype(np.uint8)).save(folder / "a.png")
    Image.fromarray((rng.random((64, 100, 3)) * 255).astype(np.uint8)).save(folder / "sub" / "b.jpg")
    hu = rng.normal(-300, 400, (40, 50, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.0, 1.0])), folder / "c.nii.gz")


def test_embed_gives_the_feature_path_vectors(tmp_path):
    """embed on files == the feature path on a cache that `data.py prepare` made of the same files at the
    checkpoint's sizes (float16 in the cache: close, not equal); embed on a cache == the feature path, exactly."""
    model = tiny(seed=3).eval()
    ckpt = save(model, tmp_path / "m.pt", stage=3, size_2d=56, size_3d=28)
    write_inputs(tmp_path / "in")
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "files.npz"), str(tmp_path / "in"),
                       "--batch-tokens", "20"]) == 0
    got = np.load(tmp_path / "files.npz")
    assert list(got["ids"]) == ["a", "c", "sub/b"] and got["x"].shape == (3, 32)
    ref = {}
    for kind, size in (("folder2d", 56), ("folder3d", 28)):
        data.prepare(kind, tmp_path / "in", tmp_path / kind, readers.Options(size=size))
        ref |= dict(zip(*[(f := features.extract_features(model, data.open_dataset(tmp_path / kind, "train"), 32768))[k]
                          for k in ("ids", "x")]))
    assert np.allclose(got["x"], [ref[i] for i in got["ids"]], atol=2e-3)
    assert np.abs(got["x"][0] - got["x"][2]).max() > 0.1  # the tolerance is far below what tells images apart

    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "one.npz"), str(tmp_path / "in" / "a.png")]) == 0
    one = np.load(tmp_path / "one.npz")
    assert list(one["ids"]) == [str(tmp_path / "in" / "a")] and np.allclose(one["x"][0], got["x"][0], atol=1e-5)

    cache = data.open_dataset(tmp_path / "folder2d", "train")
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "cache.npz"), str(tmp_path / "folder2d")]) == 0
    emb, feat = np.load(tmp_path / "cache.npz"), features.extract_features(model, cache, 32768)
    assert np.array_equal(emb["ids"], feat["ids"]) and np.array_equal(emb["x"], feat["x"])


def test_embed_reads_a_dicom_series_as_prepare_does(tmp_path):
    """A folder of DICOM files (a CT series here) embeds like the cache `data.py prepare --dataset dicom` makes."""
    pytest.importorskip("pydicom")
    from test_data import write_series
    model = tiny(seed=3).eval()
    ckpt = save(model, tmp_path / "m.pt", stage=3, size_2d=56, size_3d=28)
    write_series(tmp_path / "dicom" / "one", "axial", "1.2.826.0.1.3680043.8.498.7")
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "d.npz"), str(tmp_path / "dicom")]) == 0
    got = np.load(tmp_path / "d.npz")
    data.prepare("dicom", tmp_path / "dicom", tmp_path / "cache", readers.Options(size=28))
    ref = features.extract_features(model, data.open_dataset(tmp_path / "cache", "train"), 32768)
    assert list(got["ids"]) == list(ref["ids"]) and len(got["ids"]) == 1
    assert np.allclose(got["x"], ref["x"], atol=2e-3)  # the cache stores float16


def test_embed_skips_an_unreadable_file_and_names_it_also_with_workers(tmp_path, capsys):
    """A folder with one bad file among good ones: the good files' embeddings == those of the folder without it
    (read in worker processes too), the bad one named with its reason and counted; nothing readable: one error."""
    ckpt = save(tiny(seed=3).eval(), tmp_path / "m.pt", stage=3, size_2d=56, size_3d=28)
    write_inputs(tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "in")
    (tmp_path / "in" / "sub" / "text.png").write_text("not an image")
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "clean.npz"), str(tmp_path / "clean")]) == 0
    clean = np.load(tmp_path / "clean.npz")
    capsys.readouterr()
    for workers in ("0", "2"):
        out = tmp_path / f"in{workers}.npz"
        assert probe.main(["embed", "--ckpt", ckpt, "--out", str(out), str(tmp_path / "in"), "--workers", workers]) == 0
        got, err = np.load(out), capsys.readouterr().err.splitlines()
        assert list(got["ids"]) == list(clean["ids"]) == ["a", "c", "sub/b"]
        assert np.allclose(got["x"], clean["x"], atol=1e-6)
        assert [Path(s).relative_to(tmp_path / "in") for s in got["source"]] == \
            [Path(s).relative_to(tmp_path / "clean") for s in clean["source"]]
        bad = str(tmp_path / "in" / "sub" / "text.png")
        assert err == [f"skipping {bad}: cannot identify image file '{bad}'", f"skipped 1 of 4 inputs: {bad}"], err
    (tmp_path / "in" / "a.png").write_text("")
    (tmp_path / "in" / "c.nii.gz").write_bytes(b"\x1f\x8b cut")
    (tmp_path / "in" / "sub" / "b.jpg").unlink()
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "none.npz"), str(tmp_path / "in")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("skipping ") for line in err[:3]), err
    assert err[3].startswith("probe.py embed: error: none of the 3 inputs could be read") and "Traceback" not in err[3]
    assert not (tmp_path / "none.npz").exists()


def test_embed_reads_a_single_dicom_file_as_the_folder_holding_it(tmp_path, capsys):
    """A DICOM radiograph named alone (.dcm or any name) == the same file in a folder; one slice of a CT series is
    one line naming the folder to give; a series that is no volume, in a folder, is skipped and named."""
    pytest.importorskip("pydicom")
    from test_data import write_dicom, write_series
    ckpt = save(tiny(seed=3).eval(), tmp_path / "m.pt", stage=3, size_2d=56, size_3d=28)
    pixels = (np.random.default_rng(0).random((90, 70)) * 3000).astype(np.uint16)
    write_dicom(tmp_path / "dx" / "chest.dcm", pixels, series="1.2.3.30", modality="DX", patient="P9")
    write_dicom(tmp_path / "dx" / "mr" / "a", pixels, series="1.2.3.31", modality="MR")
    write_dicom(tmp_path / "dx" / "mr" / "b", pixels, series="1.2.3.31", modality="MR", position=(0, 0, 2))
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "folder.npz"), str(tmp_path / "dx")]) == 0
    err = capsys.readouterr().err
    assert "modality MR: only CT series and CR/DX/DR radiographs are read" in err and "skipped 1 of 2 inputs" in err
    folder = np.load(tmp_path / "folder.npz")
    shutil.copy(tmp_path / "dx" / "chest.dcm", tmp_path / "chest")  # DICOM without the extension
    for name in ("dx/chest.dcm", "chest"):
        out = tmp_path / f"{name.replace('/', '_')}.npz"
        assert probe.main(["embed", "--ckpt", ckpt, "--out", str(out), str(tmp_path / name)]) == 0, capsys.readouterr()
        one = np.load(out)
        assert list(one["ids"]) == list(folder["ids"]) and one["ids"][0].startswith("P9/")
        assert np.array_equal(one["x"], folder["x"]) and list(one["source"]) == [str(tmp_path / name)]
    write_series(tmp_path / "ct", "axial", "1.2.3.32")
    slice_ = tmp_path / "ct" / "IM0003"
    assert probe.main(["embed", "--ckpt", ckpt, "--out", str(tmp_path / "s.npz"), str(slice_)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{slice_}: one slice of a CT series of 5 files: give its folder" in err, err


def test_embed_help_names_dicom_files_and_series(capsys):
    with pytest.raises(SystemExit):
        features.embed_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DICOM radiographs (CR/DX; .dcm or any name)" in text and "DICOM files and series" in text
    assert "skipped and named" in text


def test_embed_of_a_checkpoint_through_features_gives_its_tables(run, tmp_path):
    """Issue 17's round trip: `embed` of every (dataset, split) into DIR (one file's rows then shuffled, with an id
    the probe must ignore), read back through --features: the same Table 1, 2 and 3 numbers as --ckpt, the rows
    marked as external features."""
    folder = tmp_path / "feats"
    datasets = role_datasets(run["argv"])
    for role, ds in datasets.items():
        n = "128" if ds.split == "train" else "64"
        assert probe.main(["embed", "--ckpt", run["trained"], "--out", features.features_path(str(folder), ds),
                           ds.name, "--split", ds.split, "--n", n, "--size-2d", "56", "--size-3d", "28"]) == 0
    path = features.features_path(str(folder), datasets["mimic"])
    f = dict(np.load(path))
    order = np.random.default_rng(0).permutation(len(f["ids"]))
    features.write_embeddings(path, {"ids": np.r_[f["ids"][order], ["not-in-the-split"]], "x": np.r_[f["x"][order], f["x"][:1]]})
    out = tmp_path / "out"
    shutil.copytree(run["out"] / "cache", out / "cache")  # S3's own features: from the cache, as in the run
    assert probe.main(["--ckpt", f"S3={run['trained']}", "--features", f"Ext={folder}", "--out", str(out),
                       "--bootstrap", "200", "--maps", "0", "--device", "cpu", *PHANTOM]) == 0
    rows, before = macro_rows(out), macro_rows(run["out"])
    assert len(rows) == 8
    for (test_set, model_name, lp), numbers in rows.items():
        assert numbers == rows[(test_set, "S3", lp)] == before[(test_set, "S3", lp)]
    t2 = read_json(out / "table2.json")[0]["data"]
    assert t2[0]["adapted"] == t2[1]["adapted"] and t2[1]["model"] == "Ext"
    t3 = read_json(out / "table3.json")[0]["rows"]
    assert [r[3:] for r in t3 if r[1] == "S3"] == [r[3:] for r in t3 if r[1] == "Ext"]
    md = (out / "table1.md").read_text()
    assert f"Ext: external features read from {folder}" in md and "S3: external" not in md


def test_embed_bad_inputs_give_one_clear_line(run, tmp_path, capsys):
    write_inputs(tmp_path / "one")
    write_inputs(tmp_path / "two")
    (tmp_path / "broken.png").write_text("not an image")
    Image.fromarray(np.full((30, 30), 7, np.uint8)).save(tmp_path / "flat.png")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {"broken.png": "cannot identify image file", "flat.png": "constant image", "missing.png": "not found",
             "notes.txt": "not a PNG/JPG image, a NIfTI volume (.nii, .nii.gz) or a DICOM file"}
    for name, says in cases.items():
        argv = ["embed", "--ckpt", run["random"], "--out", str(tmp_path / "e.npz"), str(tmp_path / name)]
        assert probe.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and name in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert probe.main(["embed", "--ckpt", run["random"], "--out", str(tmp_path / "e.npz"), str(tmp_path / "one"),
                       str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "id 'a' comes from" in err and str(tmp_path / "two" / "a.png") in err
    assert not (tmp_path / "e.npz").exists()


def test_retrieval_table_is_the_ranks_of_each_patients_own_ct_among_the_features(run):
    """The probe's cross-modal table == retrieval.ranks of the same model's features of the paired test patients
    (radiographs rendered from the CT phantom's own patients: same ids, same labels)."""
    import retrieval
    args = probe.get_args(run["argv"])
    features.train_sizes(args, load_checkpoint(run["trained"])["args"])
    datasets = probe.open_datasets(probe.resolve_sources(["phantom"], args.lp), args)
    xray, ct = datasets["paired_2d"], datasets["ctrate"]
    assert xray.ids == ct.ids and xray.modality == "2d" and np.array_equal(xray.labels, ct.labels, equal_nan=True)
    model, _ = backbone_from_checkpoint(run["trained"], attn="sdpa")
    f2, f3 = (features.extract_features(model, ds, 32768) for ds in (xray, ct))
    r = retrieval.ranks(f2["x"], f3["x"])
    rows = read_json(run["out"] / "retrieval.json")
    got = next(d for d in rows[0]["data"] if d["model"] == "S3" and d["direction"] == "2D -> 3D" and not d["centred"])
    assert got["n"] == len(ct) and got["R@5"]["value"] == pytest.approx((r <= 5).mean())
    assert got["median rank"]["value"] == pytest.approx(np.median(r))
    transfer = {(d["model"], d["lp"]) for d in rows[1]["data"]}
    assert transfer == {("S3", "2D"), ("S3", "3D"), ("Random", "2D"), ("Random", "3D")}


def test_paired_2d_drr_pairs_each_phantom_ct_with_its_own_drr():
    """--paired-2d drr: the paired radiographs of the CT-RATE stand-in's test patients are their CTs' DRRs, in
    the CTs' order and at the 2D long side; the default stays the phantom's own radiographs."""
    args = probe.get_args(["--ckpt", "x.pt", "--paired-2d", "drr", *PHANTOM])
    sources = probe.paired_drrs(probe.resolve_sources(["phantom"], ["2D", "3D", "ALL"]))
    assert "DRRs" in sources["paired_2d"].title
    ds = probe.open_datasets({r: sources[r] for r in probe.PAIRED}, args)
    films, cts = ds["paired_2d"], ds["ctrate"]
    assert films.ids == cts.ids and len(cts) == 64 and films[3].modality == "2d"
    assert np.array_equal(films[3].image, data.drr_record(cts[3], 56).image) and max(films[3].image.shape) == 56
    plain = probe.open_datasets({"paired_2d": probe.resolve_sources(["phantom"], ["2D"])["paired_2d"]}, args)
    assert plain["paired_2d"].name == "phantom3d-xray"
