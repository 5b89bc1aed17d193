"""readers.py, data.py and views.py: readers on fixture trees that mimic each real layout, preprocessing,
the cache, phantoms, multi-crop views and the mixed loader (all on CPU, tiny sizes)."""
import csv
import gzip
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import phantom
import readers
from views import Batch, make_loader, make_views, photometric, whole_view

nib = pytest.importorskip("nibabel")
from PIL import Image  # noqa: E402

NAN = float("nan")
ALL14 = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
         "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
         "Fracture", "Support Devices"]


# ---------------------------------------------------------------- fixture helpers

def write_jpg(path: Path, h=40, w=32, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path, quality=95)


def write_csv(path: Path, header, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def labels_of(ds):
    return {ds.ids[i]: ds[i].labels for i in range(len(ds))}


def same(a, b):
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), equal_nan=True)


def opt(**kw):
    return readers.Options(size=28, **kw)


def real(name: str) -> Path:
    """A sample of ../shared/real (beside the repo) or $MMV_REAL; the test skips where it is absent."""
    root = Path(os.environ.get("MMV_REAL") or Path(__file__).resolve().parents[1] / ".." / "shared" / "real")
    if not (root / name).exists():
        pytest.skip(f"real sample {root / name} not found")
    return root / name


def prepared(name, root, tmp_path, **kw):
    out = tmp_path / f"cache-{name}"
    data.prepare(name, root, out, opt(**kw))
    return out


# ---------------------------------------------------------------- MIMIC-CXR-JPG

def mimic_tree(root: Path):
    studies = [  # subject, study, [(dicom, view)], split, labels row (5 paper labels)
        ("10000032", "50414267", [("aaaaaaa1-11111111-22222222-33333333-44444444", "AP"),
                                  ("aaaaaaa2-11111111-22222222-33333333-44444444", "PA"),
                                  ("aaaaaaa3-11111111-22222222-33333333-44444444", "LATERAL")],
         "train", ["1.0", "0.0", "-1.0", "", "1.0"]),
        ("10000764", "57375967", [("bbbbbbb1-11111111-22222222-33333333-44444444", "AP")],
         "test", ["0.0", "1.0", "", "1.0", "0.0"]),
        ("11000011", "51234567", [("ccccccc1-11111111-22222222-33333333-44444444", "LL"),
                                  ("ccccccc2-11111111-22222222-33333333-44444444", "")],
         "train", ["1.0", "1.0", "1.0", "1.0", "1.0"]),  # no frontal view: dropped
    ]
    meta, split, lab = [], [], []
    for subject, study, images, sp, labels in studies:
        for dicom, view in images:
            meta.append([dicom, subject, study, "", view, 3056, 2544, "21800506", "213014.531"])
            split.append([dicom, study, subject, sp])
            write_jpg(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", seed=len(meta))
        row = dict(zip(ALL14, [""] * 14), **dict(zip(data.LABELS, labels)))
        lab.append([subject, study, *[row[c] for c in ALL14]])
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id",
              "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"],
              meta, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *ALL14], lab, gz=True)


def test_mimic_one_frontal_per_study_pa_first_with_label_policy(tmp_path):
    mimic_tree(tmp_path / "mimic")
    cache = prepared("mimic", tmp_path / "mimic", tmp_path, mimic_split="official")
    assert data.list_splits(str(cache)) == ["train", "test"]
    train, test = data.open_dataset(str(cache), "train"), data.open_dataset(str(cache), "test")
    assert (train.name, train.modality) == ("mimic", "2d")
    assert train.ids == ["p10000032/s50414267"] and test.ids == ["p10000764/s57375967"]
    assert same(train[0].labels, [1, 0, NAN, NAN, 1])  # -1 and blank are unknown by default
    assert same(test[0].labels, [0, 1, NAN, 1, 0])
    index = json.loads((cache / "index.json").read_text())
    assert index["records"][0]["key"].startswith("aaaaaaa2")  # PA preferred over AP
    zero = readers.scan("mimic", tmp_path / "mimic", opt(uncertain="zero", blank="zero", mimic_split="official"))
    assert same(zero[0].labels, [1, 0, 0, 0, 1])
    img = train[0].image
    assert img.shape == (1, 28, 22) and img.dtype == np.float32  # long side 28 (40x32 raw)
    assert img.min() == pytest.approx(-1, abs=1e-3) and img.max() == pytest.approx(1, abs=1e-3)


# ---------------------------------------------------------------- CheXpert

def mimic_tables(root: Path, subjects, studies_per_subject=3, unlabelled=()):
    """Metadata, label and official split tables of a MIMIC-format tree (no images: scan reads tables only)."""
    meta, split, lab = [], [], []
    for n, subject in enumerate(subjects):
        for k in range(studies_per_subject):
            study, dicom = f"5{n:04d}{k:03d}", f"{n:08x}-{k:08x}-00000000-00000000-00000000"
            meta.append([dicom, subject, study, "PA"])
            split.append([dicom, study, subject, "test" if n % 50 == 0 else ("validate" if n % 60 == 1 else "train")])
            if study not in unlabelled:
                lab.append([subject, study, *(["0.0"] * len(ALL14))])
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta,
              gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *ALL14], lab, gz=True)


def test_mimic_paper_split_is_patient_wise_80_20_stable_and_official_is_an_option(tmp_path):
    subjects = [str(10_000_000 + 7919 * n) for n in range(400)]
    mimic_tables(tmp_path / "m", subjects)
    paper = readers.scan("mimic", tmp_path / "m", opt())
    official = readers.scan("mimic", tmp_path / "m", opt(mimic_split="official"))
    assert len(paper) == len(official) == 1200 and not any(s.problem for s in paper)
    share = sum(s.split == "test" for s in paper) / len(paper)
    assert 0.16 < share < 0.24  # the paper's 20.0%; the official split gives 2%
    assert sum(s.split == "test" for s in official) / len(official) == pytest.approx(0.02)
    assert {s.split for s in paper} == {"train", "test"}  # official validate studies fall by their patient too
    side = {}
    for s in paper:
        side.setdefault(s.id.split("/")[0], set()).add(s.split)
    assert all(len(v) == 1 for v in side.values())  # no patient on both sides
    mimic_tables(tmp_path / "grown", subjects[::3] + [str(19_000_000 + n) for n in range(50)])
    was = {s.id: s.split for s in paper}
    grown = readers.scan("mimic", tmp_path / "grown", opt())
    assert all(was[s.id] == s.split for s in grown if s.id in was)  # a patient keeps its side as the tree changes
    mimic_tables(tmp_path / "small", subjects[:2], unlabelled={"50000001"})
    sources = readers.scan("mimic", tmp_path / "small", opt())
    for s in sources:
        write_jpg(Path(s.path))
    assert [s.problem for s in sources if s.problem] == [
        f"study s50000001 of p10000000 has no row in {tmp_path / 'small' / 'mimic-cxr-2.0.0-chexpert.csv.gz'}"]
    summary = data.prepare("mimic", tmp_path / "small", tmp_path / "cache", opt())
    assert summary["records"] == 5 and len(summary["failed"]) == 1  # reported and skipped, not labelled unknown
    assert json.loads((tmp_path / "cache" / "settings.json").read_text())["mimic_split"] == "paper"


def test_chexpert_study_table_labels_every_image_and_frontal_only_option(tmp_path):
    root = tmp_path / "chexpert"
    for k, view in ((1, "frontal"), (2, "lateral")):
        write_jpg(root / "test" / "patient64741" / "study1" / f"view{k}_{view}.jpg", seed=k)
    write_jpg(root / "test" / "patient64742" / "study1" / "view1_frontal.jpg", seed=3)
    row = lambda study, values: [study, *[values.get(c, 0) for c in ALL14]]
    write_csv(root / "groundtruth.csv", ["Study", *ALL14], [
        row("CheXpert-v1.0/test/patient64741/study1", {"Cardiomegaly": 1, "Pleural Effusion": 1}),
        row("CheXpert-v1.0/test/patient64742/study1", {"Atelectasis": 1})])
    ds = data.open_dataset(str(prepared("chexpert", root, tmp_path)), "test")
    got = labels_of(ds)
    assert sorted(got) == ["patient64741/study1/view1_frontal", "patient64741/study1/view2_lateral",
                           "patient64742/study1/view1_frontal"]
    assert same(got["patient64741/study1/view2_lateral"], [0, 1, 0, 0, 1])
    assert same(got["patient64742/study1/view1_frontal"], [1, 0, 0, 0, 0])
    frontal = readers.scan("chexpert", root, opt(frontal_only=True))
    assert [s.id for s in frontal] == ["patient64741/study1/view1_frontal", "patient64742/study1/view1_frontal"]


def test_chexpert_path_table_is_accepted(tmp_path):
    root = tmp_path / "chexpert"
    write_jpg(root / "test" / "patient1" / "study1" / "view1_frontal.jpg")
    values = dict.fromkeys(ALL14, "0.0") | {"Lung Opacity": "1.0", "Consolidation": "-1.0"}
    write_csv(root / "test.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *ALL14],
              [["CheXpert-v1.0/test/patient1/study1/view1_frontal.jpg", "Male", 60, "Frontal", "PA",
                *[values[c] for c in ALL14]]])
    (src,) = readers.scan("chexpert", root, opt())
    assert Path(src.path).is_file() and src.id == "patient1/study1/view1_frontal"
    assert same(src.labels, [0, 0, NAN, 1, 0])


# ---------------------------------------------------------------- CT-RATE

CTRATE_18 = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
             "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
             "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
             "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
             "Interlobular septal thickening"]


def ctrate_labels(ds: Path, split, names_positive):
    rows = [[name, *[int(c in pos) for c in CTRATE_18]] for name, pos in names_positive]
    write_csv(ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName", *CTRATE_18], rows)


def test_ctrate_v1_hu_from_metadata_rescale_and_spacing(tmp_path):
    ds = tmp_path / "CT-RATE" / "dataset"
    name = "train_1_a_1.nii.gz"
    stored = np.full((20, 20, 5), 1274, np.uint16)  # (i, j, k), k = slices; 1274 - 1024 = 250 HU
    stored[:, :, 0] = 2524  # first stored slice: 1500 HU
    img = nib.Nifti1Image(stored, np.diag([-3.0, -3.0, 9.0, 1]))  # a header v1 must not trust
    img.header.set_slope_inter(2.0, 7.0)
    path = ds / "train" / "train_1" / "train_1_a" / name
    path.parent.mkdir(parents=True)
    nib.save(img, path)
    ctrate_labels(ds, "train", [(name, {"Cardiomegaly", "Lung opacity", "Lung nodule"})])
    write_csv(ds / "metadata" / "train_metadata.csv",
              ["VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
              [[name, "X", 1, -1024, "[0.7, 0.7]", 2.8]])
    cache = prepared("ctrate", tmp_path / "CT-RATE", tmp_path)
    rec = data.open_dataset(str(cache), "train")[0]
    assert rec.id == "train_1/train_1_a_1" and rec.modality == "3d"
    assert same(rec.labels, [0, 1, 0, 1, 0])
    assert rec.image.shape == (28, 28, 28)  # 5 x 2.8 mm = 20 x 0.7 mm: a cube, from the metadata spacing
    assert np.allclose(rec.image[:-8], 0.0, atol=2e-3)  # 250 HU = the window level -> 0
    assert np.allclose(rec.image[-3:], 1.0, atol=2e-3)  # stored slice k=0 is the most inferior: last; 1500 HU -> +1


def test_ctrate_one_scan_stored_as_v1_and_as_v2_gives_the_same_cached_array(tmp_path):
    """The same HU volume as v1 (raw values, metadata slope/intercept and spacing, a header not to trust) and as
    v2 (HU, the corrected LPS header; metadata spacing that disagrees): both give one cached array."""
    rng = np.random.default_rng(0)
    true = rng.integers(-1000, 1500, (8, 14, 12)).astype(np.int16)  # (Z, Y, X): sup->inf, ant->post, right->left
    true[:2, :3, :3] = 1500  # superior-anterior-right corner
    lps = true[::-1].transpose(2, 1, 0)  # stored (i, j, k) towards Left, Posterior, Superior
    spacing = (2.0, 0.8, 0.9)  # (z, y, x) mm
    name = "valid_7_a_1.nii.gz"
    meta_row = [name, 1, -8192, f"[{spacing[1]}, {spacing[2]}]", spacing[0]]
    meta_header = ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"]
    v1 = tmp_path / "v1" / "dataset"
    path = v1 / "valid" / "valid_7" / "valid_7_a" / name
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image((lps.astype(np.int32) + 8192).astype(np.uint16), np.eye(4)), path)  # header: junk
    write_csv(v1 / "metadata" / "validation_metadata.csv", meta_header, [meta_row])
    v2 = tmp_path / "v2" / "dataset"
    path = v2 / "valid_fixed" / "valid_7" / "valid_7_a" / name
    path.parent.mkdir(parents=True)
    lps_affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])  # RAS+ affine of L, P, S axes
    nib.save(nib.Nifti1Image(lps, lps_affine), path)
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    write_csv(v2 / "metadata" / "validation_metadata.csv", meta_header, [[*meta_row[:3], "[0.5, 0.5]", 5.0]])
    for ds in (v1, v2):
        ctrate_labels(ds, "valid", [(name, {"Cardiomegaly"})])
    arrays = []
    for version, root in (("1", v1), ("2", v2)):
        cache = prepared("ctrate", root.parent, tmp_path / version)
        arrays.append(data.open_dataset(str(cache), "valid")[0].image)
    assert np.array_equal(arrays[0], arrays[1])
    assert np.array_equal(arrays[0], data._float32(data.preprocess_ct(true.astype(np.float32), spacing, 28, "x")
                                                    .astype(np.float16)))
    assert arrays[0][0, 0, 0] == pytest.approx(1.0, abs=2e-3)  # the marked corner first on every axis


def write_ras_volume(path: Path, affine_sign, shape=(16, 12, 10), zooms=(1.0, 1.0, 1.0)):
    """int16 HU volume whose marker sits at the patient's superior-anterior-right corner, whatever the affine."""
    vol = np.full(shape, 250, np.int16)
    # marker at RAS world corner (x right = max, y anterior = max, z superior = max)
    sl = tuple(slice(-3, None) if s > 0 else slice(0, 3) for s in affine_sign)
    vol[sl] = 1500
    affine = np.diag([*(s * z for s, z in zip(affine_sign, zooms)), 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, affine), path)


@pytest.mark.parametrize("affine_sign", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_ctrate_v2_fixed_keeps_hu_and_reorients_by_affine(tmp_path, affine_sign):
    ds = tmp_path / "dataset"
    name = "valid_53_a_1.nii.gz"
    write_ras_volume(ds / "valid_fixed" / "valid_53" / "valid_53_a" / name, affine_sign, zooms=(2.0, 2.0, 2.0))
    ctrate_labels(ds, "valid", [(name, {"Atelectasis", "Pleural effusion", "Consolidation"})])
    cache = prepared("ctrate", tmp_path, tmp_path)  # no metadata: v2 spacing from the header
    rec = data.open_dataset(str(cache), "valid")[0]
    assert rec.id == "valid_53/valid_53_a_1" and same(rec.labels, [1, 0, 1, 0, 1])
    assert rec.image.shape == (18, 21, 28)  # (Z, Y, X) = (k, j, i) extents 20, 24, 32 mm, long side 28
    assert rec.image[0, 0, 0] == pytest.approx(1.0, abs=2e-3)  # superior, anterior, patient right: index 0
    assert rec.image[-1, -1, -1] == pytest.approx(0.0, abs=2e-3)  # 250 HU, not rescaled twice
    assert np.argmax(rec.image.mean(axis=(1, 2))) < 4 and np.argmax(rec.image.mean(axis=(0, 1))) < 4


def test_folder3d_nifti_uses_affine_and_header_spacing(tmp_path):
    write_ras_volume(tmp_path / "vols" / "case1" / "ct.nii.gz", (-1, -1, 1), shape=(20, 20, 5), zooms=(1.0, 1.0, 4.0))
    (src,) = readers.scan("folder3d", tmp_path / "vols", opt())
    img = data.load_source(src, opt())
    assert src.id == "case1/ct" and img.shape == (28, 28, 28) and img[0, 0, 0] == pytest.approx(1.0, abs=2e-3)


# ---------------------------------------------------------------- RAD-ChestCT

def test_radchest_npz_orientation_hu_and_exact_prefix_labels(tmp_path):
    root = tmp_path / "radchest"
    root.mkdir()
    vol = np.full((20, 24, 28), -1000, np.int16)  # (Z, Y, X) superior->inferior, anterior->posterior, right->left
    vol[:3, :3, :3] = 875  # superior-anterior-right corner: 875 HU -> 0.5
    np.savez_compressed(root / "tst00007.npz", ct=vol)
    np.savez_compressed(root / "tst00008.npz", ct=vol[::-1].copy())
    cols = ["atelectasis*lung", "atelectasis*left_lower", "cardiomegaly*heart", "consolidation*right_upper",
            "opacity*lung", "groundglass_opacity*lung", "pleural_effusion*left", "pleural_effusion_like*left"]
    write_csv(root / "imgtest_Abnormality_and_Location_Labels.csv", ["NoteAcc_DEID", *cols],
              [["tst00007", 0, 1, 0, 0, 0, 1, 0, 1],   # substring decoys only for opacity and effusion
               ["tst00008", 0, 0, 1, 1, 1, 0, 1, 0]])
    ds = data.open_dataset(str(prepared("radchest", root, tmp_path)), "test")
    got = labels_of(ds)
    assert same(got["tst00007"], [1, 0, 0, 0, 0]) and same(got["tst00008"], [0, 1, 1, 1, 1])
    img = ds[ds.ids.index("tst00007")].image
    assert img.shape == (20, 24, 28)  # 0.8 mm isotropic, long side 28: no resampling
    assert img[0, 0, 0] == pytest.approx(0.5, abs=2e-3) and img[-1, -1, -1] == pytest.approx(-1.0)
    assert ds[ds.ids.index("tst00008")].image[-1, 0, 0] == pytest.approx(0.5, abs=2e-3)


# ---------------------------------------------------------------- bad input

def test_missing_root_table_and_column_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*root not found"):
        readers.scan("mimic", tmp_path / "nowhere", opt())
    root = tmp_path / "mimic"
    mimic_tree(root)
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    assert len(readers.scan("mimic", root, opt())) == 2  # the paper's split needs no split table
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv.gz: table not found"):
        readers.scan("mimic", root, opt(mimic_split="official"))
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id"], [], gz=True)
    with pytest.raises(ValueError, match=r"split.csv.gz: missing column\(s\) \['split'\]"):
        readers.scan("mimic", root, opt(mimic_split="official"))
    rad = tmp_path / "rad"
    rad.mkdir()
    np.savez_compressed(rad / "trn00001.npz", ct=np.zeros((20, 20, 20), np.int16))
    write_csv(rad / "imgtrain_Abnormality_and_Location_Labels.csv", ["NoteAcc_DEID", "atelectasis*lung"], [["trn00001", 1]])
    with pytest.raises(ValueError, match=r"imgtrain_Abnormality_and_Location_Labels.csv: no column 'cardiomegaly\*"):
        readers.scan("radchest", rad, opt())


def test_bad_table_cells_and_files_are_errors_naming_file_row_and_column(tmp_path):
    root = tmp_path / "train" / "chexpert"  # "train" in the absolute path: not a train split
    write_jpg(root / "test" / "patient1" / "study1" / "view1_frontal.jpg")
    values = dict.fromkeys(ALL14, "0.0") | {"Lung Opacity": "1.0"}
    table = ["Path", *ALL14]
    write_csv(root / "test.csv", table, [["CheXpert-v1.0/test/patient1/study1/view1_frontal.jpg", *values.values()]])
    assert [s.split for s in readers.scan("chexpert", root, opt())] == ["test"]
    values["Cardiomegaly"] = "?"
    write_csv(root / "test.csv", table, [["CheXpert-v1.0/test/patient1/study1/view1_frontal.jpg", *values.values()]])
    with pytest.raises(ValueError, match=r"test.csv row 2, column 'Cardiomegaly': label '\?' is not 1, 0, -1 or blank"):
        readers.scan("chexpert", root, opt())
    with pytest.raises(ValueError, match=r"label '2.0' is not 1, 0, -1"):
        readers.parse_label("2.0", opt())
    mimic = tmp_path / "mimic"
    mimic_tree(mimic)
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").write_text("dicom_id,split\n")  # plain text under a .gz name
    with pytest.raises(ValueError, match=r"split.csv.gz: unreadable table \(BadGzipFile"):
        readers.scan("mimic", mimic, opt(mimic_split="official"))


def ctrate_v1_tree(ds: Path, names, zspacing="2.8"):
    for name in names:
        path = ds / "train" / "train_1" / "train_1_a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.full((20, 20, 5), 1024, np.uint16), np.eye(4)), path)
    ctrate_labels(ds, "train", [(name, set()) for name in names])
    write_csv(ds / "metadata" / "train_metadata.csv", ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing",
              "ZSpacing"], [[name, 1, -1024, "[0.7, 0.7]", zspacing if i == 0 else "2.8"] for i, name in enumerate(names)])


def test_ctrate_bad_metadata_row_skips_that_volume_and_versions_never_mix(tmp_path):
    root = tmp_path / "CT-RATE"
    ds = root / "dataset"
    ctrate_v1_tree(ds, ["train_1_a_1.nii.gz", "train_1_a_2.nii.gz"], zspacing="")  # volume 1: blank ZSpacing
    sources = readers.scan("ctrate", root, opt())
    assert [bool(s.problem) for s in sources] == [True, False]  # scanned on; volume 1 reported, not the scan aborted
    assert "bad spacing or rescale for train_1_a_1.nii.gz" in sources[0].problem
    out = tmp_path / "cache"
    data.prepare("ctrate", root, out, opt())
    assert json.loads((out / "settings.json").read_text())["ctrate_version"] == "1"  # resolved, not "auto"
    fixed = ds / "valid_fixed" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz"  # a v2 split beside v1's train/
    fixed.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 5), np.int16), np.eye(4)), fixed)
    with pytest.raises(ValueError, match=r"valid_fixed/ \(v2\) beside train/ \(v1 only\)"):
        readers.scan("ctrate", root, opt())
    (ds / "train").rename(ds / "train_fixed")  # now all v2: same file names, other HU
    ctrate_labels(ds, "valid", [])
    with pytest.raises(ValueError, match="prepared with other settings.*ctrate_version"):
        data.prepare("ctrate", root, out, opt())  # never the v1 arrays reused for v2 volumes


def test_a_one_slice_volume_is_refused_not_taken_for_a_radiograph():
    with pytest.raises(ValueError, match=r"vol.nii.gz: a CT volume of 1 slice"):
        data.validate_image(np.zeros((1, 112, 112), np.float32), "vol.nii.gz", 14, is_3d=True)
    assert data.validate_image(np.zeros((1, 112, 112), np.float32), "xray.jpg", 14, is_3d=False).shape == (1, 112, 112)


def test_image_smaller_than_one_patch_is_rejected_with_its_path(tmp_path):
    write_jpg(tmp_path / "imgs" / "thin.jpg", h=300, w=8)  # long side 28 -> 28 x 1
    (src,) = readers.scan("folder2d", tmp_path / "imgs", opt())
    with pytest.raises(ValueError, match=r"thin.jpg: image \(1, 28, 1\) is smaller than one 14-pixel patch"):
        data.load_source(src, opt())
    with pytest.raises(ValueError, match="smaller than one 14-pixel patch"):
        whole_view(data.Record(np.zeros((1, 10, 40), np.float32), np.zeros(5, np.float32), "2d", "x"), 14)


def test_prepare_skips_a_corrupt_file_reports_exactly_it_and_resumes(tmp_path, capsys):
    root = tmp_path / "imgs"
    for k in range(3):
        write_jpg(root / f"p{k}" / "img.jpg", seed=k)
    bad = root / "p9" / "img.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "cache"
    first = data.prepare("folder2d", root, out, opt(), workers=2)
    assert first["converted"] == 3 and first["reused"] == 0 and first["records"] == 3
    assert [p for p, _ in first["failed"]] == [str(bad)]
    report = (out / "report.tsv").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(f"{bad}\t")
    arrays = sorted((out / "arrays").iterdir())
    stamps = [p.stat().st_mtime_ns for p in arrays]
    index = (out / "index.json").read_text()
    second = data.prepare("folder2d", root, out, opt(), workers=1)
    assert second["converted"] == 0 and second["reused"] == 3 and [p for p, _ in second["failed"]] == [str(bad)]
    assert [p.stat().st_mtime_ns for p in sorted((out / "arrays").iterdir())] == stamps
    assert (out / "index.json").read_text() == index
    assert not list(out.rglob("*.tmp"))
    ds = data.open_dataset(str(out), "train")
    assert ds.ids == ["p0/img", "p1/img", "p2/img"] and np.isnan(ds.labels).all()
    with pytest.raises(ValueError, match="other settings"):
        data.prepare("folder2d", root, out, readers.Options(size=42))
    for p in root.rglob("*.jpg"):
        p.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="nothing usable"):
        data.prepare("folder2d", root, tmp_path / "cache2", opt())


def test_check_reports_counts_prevalence_and_problem_paths(tmp_path, capsys):
    root = tmp_path / "mimic"
    mimic_tree(root)
    missing = next(root.rglob("aaaaaaa2*.jpg"))
    missing.unlink()
    report = data.check("mimic", root, opt(mimic_split="official"))
    assert report["splits"] == {"train": 1, "test": 1} and report["usable"] == {"train": 0, "test": 1}
    assert report["labels"]["train"]["Consolidation"] == [0, 0, 1]  # positive, negative, unknown
    assert [p for p, _ in report["problems"]] == [str(missing)]
    out = capsys.readouterr().out
    assert str(missing) in out
    assert "train: 1, 0 usable  (paper 2.4.1: n=133,749)" in out and "test: 1, 1 usable  (paper 2.4.1: n=33,537)" in out
    assert data.main(["check", "--dataset", "mimic", "--root", str(root), "--size", "28", "--mimic-split", "official"]) == 1


def test_check_without_full_finds_a_truncated_nifti_gz(tmp_path):
    root = tmp_path / "vols"
    root.mkdir()
    for name in ("whole", "cut"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(-1000, 1000, (40, 40, 30)).astype(np.int16),
                                 np.eye(4)), root / f"{name}.nii.gz")  # noise: compresses little, so a cut bites
    cut = root / "cut.nii.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    report = data.check("folder3d", root, opt())  # headers only
    assert [Path(p).name for p, _ in report["problems"]] == ["cut.nii.gz"]
    assert "truncated or corrupt: its gzip trailer says" in report["problems"][0][1]
    assert "implies 96352" in report["problems"][0][1]  # 352-byte header + 40 x 40 x 30 int16


def test_check_without_full_finds_a_truncated_png_and_jpeg(tmp_path):
    """A radiograph cut short keeps a readable header: check (headers only) must still call it a problem, and
    agree with what --full (decoding every file) finds."""
    root = tmp_path / "xrays"
    root.mkdir()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    for name in ("whole.png", "cut.png", "whole.jpg", "cut.jpg"):
        img.save(root / name)
    for name in ("cut.png", "cut.jpg"):
        (root / name).write_bytes((root / name).read_bytes()[:-40])
    fast, full = data.check("folder2d", root, opt()), data.check("folder2d", root, opt(), full=True)
    assert sorted(Path(p).name for p, _ in fast["problems"]) == ["cut.jpg", "cut.png"]
    assert sorted(Path(p).name for p, _ in full["problems"]) == ["cut.jpg", "cut.png"]
    assert all("truncated" in why for _, why in fast["problems"])


def test_check_of_dicom_lists_each_series_and_no_label_table(capsys):
    pytest.importorskip("pydicom")
    folder = real("ct-dicom")
    report = data.check("dicom", folder, opt())
    out = capsys.readouterr().out
    assert report["usable"] == {"train": 1} and "labels: none of the five is known" in out
    assert "positive" not in out  # no table of zeros
    assert f"CT series {folder / 'Lung_Dx-A0002-B40f'}: 30 files, usable" in out


def test_ct_resampling_keeps_anatomy_proportions():
    hu = np.zeros((10, 40, 20), np.float32)  # 4 mm slices, 1 mm pixels: 40 x 40 x 20 mm
    out = data.preprocess_ct(hu, (4.0, 1.0, 1.0), 28, "x")
    assert out.shape == (28, 28, 14)
    assert data.window_ct(np.array([-1000.0, 250.0, 875.0, 1500.0, 3000.0])).tolist() == [-1, 0, 0.5, 1, 1]


def test_cache_fingerprint_changes_with_content_and_corrupt_array_is_skipped(tmp_path):
    out = tmp_path / "cache"
    assert data.main(["prepare", "--dataset", "phantom", "--phantom", "phantom3d", "--n", "8", "--size", "28",
                      "--out", str(out), "--workers", "1"]) == 0
    ds = data.open_dataset(str(out), "train")
    assert len(ds) == 8 and ds.modality == "3d" and ds.name == "phantom3d"
    direct = data.open_dataset("phantom3d", "train", n=8, size=28)
    assert ds.ids == direct.ids and np.array_equal(ds[3].image, direct[3].image)  # cache == on the fly
    assert data.describe(str(out))["splits"] == {"train": 8, "test": 2}
    fingerprint = ds.fingerprint
    path = out / "arrays" / f"{ds.records[0]['key']}.npy"
    arr = np.load(path)
    arr[0, 0, 0] = np.nan
    np.save(path, arr)
    with pytest.raises(ValueError, match="non-finite"):
        ds[0]
    index = json.loads((out / "index.json").read_text())
    index["records"][1]["labels"][0] = 1.0 - index["records"][1]["labels"][0]
    (out / "index.json").write_text(json.dumps(index))
    assert data.open_dataset(str(out), "train").fingerprint != fingerprint
    ok = data.open_dataset(str(out), "train")
    with pytest.warns(UserWarning, match="non-finite") as caught:
        batches = list(make_loader(None, ok, batch_2d=0, batch_3d=4, steps=4, patch=14))
    assert sum(b.n_skipped for b in batches) >= 1 and ds.ids[0] not in sum((b.ids for b in batches), [])
    assert sum(str(path) in str(w.message) for w in caught) == 1  # warned once, with its path


# ---------------------------------------------------------------- phantoms

def test_phantoms_are_deterministic_with_disjoint_splits_and_sources():
    a = data.open_dataset("phantom2d", "train", n=4, size=42, seed=1)
    b = data.open_dataset("phantom2d", "train", n=4, size=42, seed=1)
    assert np.array_equal(a[2].image, b[2].image) and np.array_equal(a[2].image, a[2].image)  # memoized == fresh
    test = data.open_dataset("phantom2d", "test", n=4, size=42, seed=1)
    three = data.open_dataset("phantom3d", "train", n=4, size=42, seed=1)
    assert not set(a.ids) & set(test.ids) and not set(a.ids) & set(three.ids)
    params = lambda name, split: phantom.sample_patient(phantom.phantom_rng(name, split, 0, 1))["scale"]
    assert len({params("phantom2d", "train"), params("phantom2d", "test"), params("phantom3d", "train")}) == 3
    assert a.fingerprint != data.open_dataset("phantom2d", "train", n=4, size=42, seed=2).fingerprint
    rec, vol = a[0], three[0]
    assert rec.image.shape[0] == 1 and max(rec.image.shape) == 42 and vol.image.shape[1:] == (42, 42)
    assert -1 <= rec.image.min() and rec.image.max() <= 1 and rec.image.dtype == np.float32
    assert data.describe("phantom3d", n=4, size=28)["splits"] == {"train": 4, "test": 4}


def test_external_phantoms_have_a_shifted_acquisition():
    def noise(name):  # median difference between neighbouring pixels: the noise level, robust to edges
        ds = data.open_dataset(name, "test", n=6, size=64)
        return np.mean([np.median(np.abs(np.diff(ds[i].image, axis=-1))) for i in range(6)])
    def brightness(name):
        ds = data.open_dataset(name, "test", n=6, size=64)
        return np.mean([ds[i].image.mean() for i in range(6)])
    assert noise("phantom2d-ext") > 1.2 * noise("phantom2d") and noise("phantom3d-ext") > 2 * noise("phantom3d")
    assert brightness("phantom2d-ext") > brightness("phantom2d") + 0.05


def pooled_features(img: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(img)[None]
    if img.shape[0] == 1:
        t = t[:, 0]
        return torch.cat([torch.nn.functional.adaptive_avg_pool2d(t, 6).flatten(),
                          torch.nn.functional.adaptive_max_pool2d(t, 6).flatten()]).numpy()
    return torch.cat([torch.nn.functional.adaptive_avg_pool3d(t, 4).flatten(),
                      -torch.nn.functional.adaptive_max_pool3d(-t, 4).flatten()]).numpy()


@pytest.mark.parametrize("name,size", [("phantom2d", 48), ("phantom3d", 28)])
def test_phantom_labels_are_learnable_from_simple_features(name, size):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler
    train, test = data.open_dataset(name, "train", n=300, size=size), data.open_dataset(name, "test", n=200, size=size)
    x_train = np.stack([pooled_features(train[i].image) for i in range(len(train))])
    x_test = np.stack([pooled_features(test[i].image) for i in range(len(test))])
    assert np.all((0.08 < train.labels.mean(0)) & (train.labels.mean(0) < 0.45))  # realistic prevalences
    scaler = StandardScaler().fit(x_train)
    for k, label in enumerate(data.LABELS):
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x_train), train.labels[:, k])
        auc = roc_auc_score(test.labels[:, k], clf.predict_proba(scaler.transform(x_test))[:, 1])
        assert auc > 0.65, f"{name} {label}: AUROC {auc:.2f}"


def frontal(img: np.ndarray) -> np.ndarray:
    """A radiograph-like (H, W) picture: the image itself (2D) or the volume projected along Y (3D)."""
    return img[0] if img.shape[0] == 1 else (img + 1).mean(axis=1)


def test_cardiomegaly_widens_the_projected_heart_in_2d_and_3d_alike():
    patients = []
    for i in range(20):  # patients whose lung bases are aerated (fluid would hide the heart border)
        rng = phantom.phantom_rng("phantom2d", "train", i, 0)
        patient = phantom.sample_patient(rng)
        if patient["labels"][0] == patient["labels"][4] == 0:
            patients.append((i, rng, patient))
    for i, rng, patient in patients[:4]:
        state = rng.bit_generator.state
        centres = []
        for modality in ("2d", "3d"):
            pictures = []
            for heart_scale in (1.0, 1.5):  # same patient, same noise: only the heart differs
                rng.bit_generator.state = state
                raw = phantom.render(dict(patient, heart_scale=heart_scale), rng, modality, 64, False)
                pictures.append(frontal(data.preprocess_phantom(raw, modality, 64)))
            grown = (pictures[1] - pictures[0]) > 0.05  # lung replaced by heart: denser
            cols = np.flatnonzero(grown.any(axis=0)) / grown.shape[1]
            rows = np.flatnonzero(grown.any(axis=1)) / grown.shape[0]
            assert cols.max() - cols.min() > 0.25, f"patient {i} {modality}: the heart shadow did not widen"
            assert 0.3 < rows.mean() < 0.85  # in the lower chest, not everywhere
            centres.append(cols.mean())
        assert abs(centres[0] - centres[1]) < 0.1  # at the same place in the radiograph and the CT's projection


# ---------------------------------------------------------------- views (paper 2.4.1)

@pytest.mark.parametrize("shape", [(1, 200, 160), (64, 64, 48)])
def test_views_scales_within_bounds_for_2d_and_3d(shape):
    image = np.zeros(shape, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        views = make_views(image, rng, patch=1)
        frac = np.array([v[0].numel() / image.size for v in views])
        assert len(views) == 10
        assert np.all((0.3 * 0.9 <= frac[:2]) & (frac[:2] <= 1.0))
        assert np.all((0.05 * 0.9 <= frac[2:]) & (frac[2:] <= 0.3 * 1.1))
        for v in views:
            assert v.shape[1] == 1 if shape[0] == 1 else v.shape[1] > 1
            sides = np.array(v.shape[1:], float)[[shape[0] > 1, True, True]] / np.array(shape)[[shape[0] > 1, True, True]]
            assert sides.max() / sides.min() < 4 / 3 * 1.15  # modest aspect jitter around the image's proportions


@pytest.mark.parametrize("shape", [(1, 224, 182), (84, 112, 112), (14, 30, 100)])
def test_views_counts_and_whole_patches_at_native_resolution(shape):
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # every voxel unique
    views = make_views(image, np.random.default_rng(1), patch=14, n_global=3, n_local=5)
    assert len(views) == 8
    for v in views:
        assert v.dtype == torch.float32 and v.shape[0] == 1
        _, z, h, w = v.shape
        assert (z == 1) if shape[0] == 1 else (z % 14 == 0 and z >= 14)
        assert h % 14 == 0 and w % 14 == 0 and h >= 14 and w >= 14
        z0, y0, x0 = np.unravel_index(int(v[0, 0, 0, 0]), shape)  # a crop, not a resize
        assert torch.equal(v[0], torch.from_numpy(image[z0:z0 + z, y0:y0 + h, x0:x0 + w]))
    big = np.array([v.numel() for v in views])
    assert big[:3].mean() > big[3:].mean()


def test_whole_view_is_a_centred_crop_to_whole_patches():
    image = np.arange(20 * 30 * 45, dtype=np.float32).reshape(20, 30, 45)
    v = whole_view(data.Record(image, np.zeros(5, np.float32), "3d", "x"), 14)
    assert v.shape == (1, 14, 28, 42) and torch.equal(v[0], torch.from_numpy(image[3:17, 1:29, 1:43]))
    flat = whole_view(data.Record(image[:1], np.zeros(5, np.float32), "2d", "x"), 14)
    assert flat.shape == (1, 1, 28, 42)


# ---------------------------------------------------------------- loader

def small_sets():
    return (data.open_dataset("phantom2d", "train", n=12, size=42),
            data.open_dataset("phantom3d", "train", n=6, size=28))


def packed_equal(a, b):
    pairs = [(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)]
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in pairs)


def test_loader_batch_is_view_major_with_2d_first():
    d2, d3 = small_sets()
    loader = make_loader(d2, d3, batch_2d=4, batch_3d=2, steps=1, patch=14)
    (batch,) = list(loader)
    ids, labels, is_3d, views, _ = loader.dataset.sample(0)
    assert (batch.n_samples, batch.n_views, batch.n_global, batch.packed.n_views) == (6, 10, 2, 60)
    assert batch.is_3d.tolist() == [False] * 4 + [True] * 2 and batch.ids == ids
    assert torch.equal(batch.labels, torch.from_numpy(labels)) and batch.labels.dtype == torch.float32
    for v in range(10):
        for n in range(6):
            assert batch.packed.view_grid[v * 6 + n].tolist() == [max(1, views[n][v].shape[1] // 14),
                                                                  views[n][v].shape[2] // 14, views[n][v].shape[3] // 14]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.step == 0


def test_loader_two_ranks_cover_the_global_batch_without_overlap_and_same_views():
    d2, d3 = small_sets()
    kw = dict(batch_2d=4, batch_3d=2, steps=3, patch=14, seed=5)
    whole = make_loader(d2, d3, **kw).dataset
    ranks = [make_loader(d2, d3, rank=r, world=2, **kw).dataset for r in range(2)]
    for step in range(3):
        ids, labels, _, views, _ = whole.sample(step)
        parts = [r.sample(step) for r in ranks]
        assert not set(parts[0][0]) & set(parts[1][0])
        assert parts[0][0][:2] + parts[1][0][:2] + parts[0][0][2:] + parts[1][0][2:] == ids
        ranked_views = parts[0][3][:2] + parts[1][3][:2] + parts[0][3][2:] + parts[1][3][2:]
        for a, b in zip(views, ranked_views):  # same global position -> identical views
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    seen = [i for s in range(2) for i in whole.sample(s)[0] if i.startswith("phantom2d")]
    assert len(set(seen)) == 8  # two steps of one epoch's permutation: no repeats
    with pytest.raises(ValueError, match="batch_3d=3 is not divisible by world=2"):
        make_loader(d2, d3, batch_2d=4, batch_3d=3, steps=1, world=2)


def test_loader_resume_equals_the_uninterrupted_stream_and_workers_agree():
    d2, d3 = small_sets()
    kw = dict(batch_2d=2, batch_3d=2, steps=5, patch=14, seed=3)
    full = list(make_loader(d2, d3, **kw))
    resumed = list(make_loader(d2, d3, start_step=3, **kw))
    assert [b.step for b in resumed] == [3, 4]
    for a, b in zip(full[3:], resumed):
        assert a.ids == b.ids and packed_equal(a.packed, b.packed) and torch.equal(a.labels, b.labels)
    in_worker = list(make_loader(d2, d3, start_step=3, workers=1, **kw))
    assert all(packed_equal(a.packed, b.packed) for a, b in zip(resumed, in_worker))
    epochs = [i for b in full for i in b.ids if i.startswith("phantom3d")]  # 10 draws over 6 volumes
    assert sorted(epochs[:6]) == sorted(d3.ids)


def test_loader_supervised_mode_gives_one_global_view_with_labels():
    d2, _ = small_sets()
    (batch,) = list(make_loader(d2, None, batch_2d=4, batch_3d=8, steps=1, mode="supervised", patch=14))
    assert (batch.n_views, batch.n_global, batch.packed.n_views, batch.n_samples) == (1, 1, 4, 4)
    assert not batch.is_3d.any()
    expected = np.stack([d2[d2.ids.index(i)].labels for i in batch.ids])
    assert torch.equal(batch.labels, torch.from_numpy(expected))


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "last.pt"
    data.atomic_write(path, lambda f: f.write(b"old"))

    def fails_halfway(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        data.atomic_write(path, fails_halfway)
    assert path.read_bytes() == b"old"  # the previous file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # and no temporary file left behind


def test_photometric_keeps_shape_and_range_and_blurs_the_patched_axes_only(monkeypatch):
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 28, 42), (1, 28, 14, 42)]:
        view = torch.rand(shape) * 2 - 1
        for _ in range(20):
            out = photometric(view, rng)
            assert out.shape == view.shape and out.min() >= -1 and out.max() <= 1
    monkeypatch.setattr("views.JITTER_P", 0.0)
    monkeypatch.setattr("views.SOLARIZE_P", 0.0)
    monkeypatch.setattr("views.BLUR_P", 1.0)
    flat = torch.full((1, 14, 14, 14), 0.3)
    assert torch.allclose(photometric(flat, rng), flat, atol=1e-6)  # blur keeps a uniform region
    for z in (1, 15):
        delta = torch.full((1, z, 21, 21), -1.0)
        delta[0, z // 2, 10, 10] = 1.0
        light = (photometric(delta, rng) + 1) / 2
        assert light.sum() == pytest.approx(1.0, abs=1e-5)  # blur moves light, never makes or loses it
        assert light[0, z // 2, 10, 10] < 1.0 and light[0, z // 2, 10, 11] > 0
        assert (z == 1) or light[0, z // 2 + 1, 10, 10] > 0  # volumes blur across slices, radiographs cannot


def test_photometric_views_are_the_same_crops():
    ds = data.open_dataset("phantom2d", "train", n=4, size=56)
    shapes = {}
    for on in (False, True):
        batch = next(iter(make_loader(ds, None, batch_2d=4, batch_3d=0, steps=1, patch=14, photometric=on)))
        shapes[on] = batch.packed.view_grid.tolist()
        assert batch.packed.patches_2d.abs().max() <= 1
    assert shapes[False] == shapes[True]


def test_gamma_views_are_the_same_crops_each_under_its_own_monotone_calibration():
    """--gamma: each view is its crop without --gamma through x -> x^g on [0, 1], one g per view, within the
    strength's range; the crops themselves are the same."""
    ds = data.open_dataset("phantom3d", "train", n=2, size=42)
    plain, jittered = (next(iter(make_loader(None, ds, batch_2d=0, batch_3d=2, steps=1, patch=14, gamma=g)))
                       for g in (0.0, 0.5))
    assert plain.packed.seqlens == jittered.packed.seqlens
    a, b = ((p.packed.patches_3d + 1) / 2 for p in (plain, jittered))
    exponents = []
    for v, (start, end) in enumerate(zip(plain.packed.cu_seqlens[:-1].tolist(), plain.packed.cu_seqlens[1:].tolist())):
        x, y = a[start:end].flatten().double(), b[start:end].flatten().double()
        inside = (x > 0.05) & (x < 0.95)
        g = (y[inside].log() / x[inside].log())
        assert g.std() < 1e-3 * g.mean()  # one exponent for the whole view
        exponents.append(g.mean().item())
    assert 1 / 1.5 - 1e-3 < min(exponents) < max(exponents) < 1.5 + 1e-3 and np.ptp(exponents) > 0.1


def test_local_grid_resizes_local_crops_only_to_a_fixed_token_count():
    """--local-grid G: every local view is G patches per patched axis (2D G^2 tokens, 3D G^3), resized from its
    crop (a constant image stays that constant); the global views are the same native crops as without."""
    rng_args = dict(patch=14, n_global=2, n_local=6)
    for shape in ((1, 112, 98), (56, 56, 42)):
        image = np.full(shape, 0.25, np.float32)
        native = make_views(image, np.random.default_rng(5), **rng_args)
        resized = make_views(image, np.random.default_rng(5), **rng_args, local_grid=3)
        assert [v.shape for v in resized[:2]] == [v.shape for v in native[:2]]
        want = (1, 1, 42, 42) if shape[0] == 1 else (1, 42, 42, 42)
        assert all(tuple(v.shape) == want for v in resized[2:]) and all(torch.allclose(v, torch.tensor(0.25)) for v in resized)
        assert {tuple(v.shape) for v in native[2:]} != {want}  # native local crops vary in size


def _crop_of(view: np.ndarray, image: np.ndarray) -> bool:
    """Whether view (h, w) is a contiguous crop of image (H, W)."""
    h, w = view.shape
    return any(np.array_equal(image[y:y + h, x:x + w], view)
               for y in range(image.shape[0] - h + 1) for x in range(image.shape[1] - w + 1))


def test_paired_views_are_drr_crops_in_the_last_local_slots_of_ct_samples_only():
    """--paired-views: the CT samples' own crops and the radiographs' views are the default's, view for view;
    the last local slots of each CT sample hold 2D crops of that patient's DRR (data.drr_record), found in
    the film by brute force."""
    ds2 = data.open_dataset("phantom2d", "train", n=4, size=56)
    ds3 = data.open_dataset("phantom3d", "train", n=4, size=28)
    steps = {k: make_loader(ds2, ds3, batch_2d=2, batch_3d=2, steps=1, patch=14, n_local=3, paired_views=k,
                            drr_size=56).dataset.sample(0) for k in (0, 2)}
    (ids, _, is_3d, plain, _), (_, _, _, paired, _) = steps[0], steps[2]
    assert is_3d.tolist() == [False, False, True, True]
    for sample, rec_id in enumerate(ids):
        for slot in range(5):
            if not is_3d[sample] or slot < 3:  # radiographs, and the CT's global views and first local view
                assert torch.equal(plain[sample][slot], paired[sample][slot])
            else:
                assert plain[sample][slot].shape[1] > 1 and paired[sample][slot].shape[1] == 1
                film = data.drr_record(ds3[int(rec_id.rsplit("-", 1)[1])], 56).image[0]
                assert _crop_of(paired[sample][slot][0, 0].numpy(), film)
    with pytest.raises(ValueError, match="paired_views=4 must be in"):
        make_loader(ds2, ds3, batch_2d=2, batch_3d=2, steps=1, patch=14, n_local=3, paired_views=4)


def test_external_shifts_one_at_a_time_change_only_what_they_name():
    """render(external=...) with one of phantom.EXTERNAL_SHIFTS (controls.py --shifts): the same patient and the same
    random draws; all three are the external acquisition itself, bit for bit, and none is the internal one."""
    def draw(modality, shifts, noise=None):
        rng = phantom.phantom_rng("phantom2d", "test", 5, 0)
        p = phantom.sample_patient(rng)
        p["noise"] = p["noise"] if noise is None else noise
        return phantom.render(p, rng, modality, 28, shifts)

    for m in ("2d", "3d"):
        assert np.array_equal(draw(m, True), draw(m, phantom.EXTERNAL_SHIFTS))
        assert np.array_equal(draw(m, False), draw(m, ()))
        clean, none, noisy = draw(m, (), noise=0.0), draw(m, ()), draw(m, ("noise",))
        assert np.allclose(noisy - clean, 2.5 * (none - clean), atol=1e-4)  # the same noise draw, 2.5x as strong
        coarse = draw(m, ("resolution",), noise=0.0)
        assert coarse.shape == clean.shape and not np.array_equal(coarse, clean)
    assert np.allclose(draw("3d", ("calibration",), noise=0.0), draw("3d", (), noise=0.0) * 1.04 + 30, atol=1e-3)
    assert np.allclose(draw("2d", ("calibration",), noise=0.0), draw("2d", (), noise=0.0) ** 0.7, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown acquisition shift\(s\) \['blur'\]"):
        draw("2d", ("blur",))
    plain = data.PhantomDataset("phantom2d", "test", n=3, size=28)
    shifted = data.PhantomDataset("phantom2d", "test", n=3, size=28, shifts=("noise",))
    assert shifted.ids == plain.ids and np.array_equal(shifted.labels, plain.labels)
    assert shifted.fingerprint != plain.fingerprint and shifted.name == "phantom2d[noise]"
    assert not np.array_equal(shifted[0].image, plain[0].image)


def test_phantom_py_stands_alone_and_is_preprocessed_like_real_images():
    import ast
    tree = ast.parse(Path(phantom.__file__).read_text())
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported <= {"math", "statistics", "numpy", "torch"}  # nothing from the project
    rng = phantom.phantom_rng("phantom3d", "train", 0, 0)
    hu = phantom.render(phantom.sample_patient(rng), rng, "3d", 28, False)
    assert hu.shape[1:] == (28, 28) and hu.min() < -900 and hu.max() > 300  # HU: air and bone, unwindowed
    assert np.array_equal(data.preprocess_phantom(hu, "3d", 28), data.window_ct(hu))  # resampling keeps every value
    rng = phantom.phantom_rng("phantom2d", "train", 0, 0)
    line = phantom.render(phantom.sample_patient(rng), rng, "2d", 42, False)
    assert line.shape[0] == 42 and line.min() >= -0.1  # a line integral, not yet min-maxed
    assert np.array_equal(data.preprocess_phantom(line, "2d", 42), data.minmax(line, "x")[None])


# ---------------------------------------------------------------- NIH ChestX-ray14

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def nih_tree(root: Path, rows, folders=True):
    """rows: (image index, findings, patient id); header and rows as the official table (11 fields a row)."""
    for k, (name, _, _) in enumerate(rows):
        folder = root / (f"images_{k % 2 + 1:03d}" if folders else "") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    write_csv(root / readers.NIH_TABLE, NIH_HEADER,
              [[name, findings, 0, patient, 60, "M", "PA", 2500, 2048, 0.143, 0.143] for name, findings, patient in rows])


def test_nih_labels_official_split_and_ids_keep_the_image_index(tmp_path):
    rows = [("00000001_000.png", "Cardiomegaly|Effusion", "1"), ("00000001_001.png", "No Finding", "1"),
            ("00000002_000.png", "Atelectasis|Consolidation|Infiltration", "2"), ("00000003_000.png", "Hernia", "3")]
    root = tmp_path / "nih"
    nih_tree(root, rows)
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n")
    (root / "test_list.txt").write_text("00000002_000.png\n")
    cache = prepared("nih", root, tmp_path)
    train, test = data.open_dataset(str(cache), "train"), data.open_dataset(str(cache), "test")
    assert train.ids == ["1/00000001_000.png", "1/00000001_001.png", "3/00000003_000.png"]
    assert test.ids == ["2/00000002_000.png"] and train.modality == "2d"
    got = labels_of(train) | labels_of(test)
    assert same(got["1/00000001_000.png"], [0, 1, 0, NAN, 1])  # Effusion = Pleural Effusion; no Lung Opacity label
    assert same(got["1/00000001_001.png"], [0, 0, 0, NAN, 0])  # No Finding: negative for all four
    assert same(got["2/00000002_000.png"], [1, 0, 1, NAN, 0]) and same(got["3/00000003_000.png"], [0, 0, 0, NAN, 0])
    direct = data.preprocess_xray(Image.open(next(root.rglob("00000002_000.png"))), 28, "x")
    assert np.array_equal(test[0].image, data._float32(direct.astype(np.float16)))  # the image as PIL reads it
    (root / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.txt: not found beside .*train_val_list.txt"):
        readers.scan("nih", root, opt())


def test_nih_without_split_lists_splits_by_patient_stably_and_reports_missing_images(tmp_path):
    rows = [(f"{p:08d}_{k:03d}.png", "No Finding", str(p)) for p in range(1, 41) for k in range(3)]
    root = tmp_path / "nih"
    nih_tree(root, rows, folders=False)  # one flat images/ folder, as the real sample
    sources = readers.scan("nih", root, opt())
    side = {}
    for src in sources:
        side.setdefault(src.id.split("/")[0], set()).add(src.split)
    assert all(len(s) == 1 for s in side.values())  # no patient on both sides
    n_test = sum(s == {"test"} for s in side.values())
    assert 2 <= n_test <= 16  # ~20% of 40 patients
    assert [s.split for s in readers.scan("nih", root, opt())] == [s.split for s in sources]  # deterministic
    assert [s.split for s in readers.scan("nih", root, opt(seed=1))] != [s.split for s in sources]  # seeded
    grown = rows[::2] + [("00000099_000.png", "No Finding", "99")]  # fewer and other patients: same sides
    nih_tree(tmp_path / "nih2", grown, folders=False)
    kept = {s.id: s.split for s in readers.scan("nih", tmp_path / "nih2", opt())}
    assert all(kept[s.id] == s.split for s in sources if s.id in kept)
    next(root.rglob("00000005_001.png")).unlink()
    report = data.check("nih", root, opt())
    assert [Path(p).name for p, _ in report["problems"]] == ["00000005_001.png"]
    assert "not found under" in report["problems"][0][1]
    write_csv(root / readers.NIH_TABLE, NIH_HEADER, [["00000001_000.png", "Cardiomegaly|Pneumothrax", 0, "1", 60, "M",
                                                  "PA", 1, 1, 0.1, 0.1]])
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020.csv row 2: Finding Labels 'Cardiomegaly\|Pneumothrax'"):
        readers.scan("nih", root, opt())
    (root / readers.NIH_TABLE).rename(root / readers.NIH_TABLE_2017)  # the 2017 release's table, alone: read
    with pytest.raises(ValueError, match=r"Data_Entry_2017.csv row 2: Finding Labels"):
        readers.scan("nih", root, opt())
    (root / readers.NIH_TABLE_2017).unlink()
    with pytest.raises(FileNotFoundError, match=r"Data_Entry_2017_v2020.csv: table not found"):
        readers.scan("nih", root, opt())


def test_nih_real_sample_counts_labels_and_patient_disjoint_split():
    root = real("nih-cxr14-sample")
    sources = readers.scan("nih", root, opt())
    assert len(sources) == 1000 and not any(s.problem for s in sources)
    labels = np.stack([s.labels for s in sources])
    assert np.nansum(labels, 0)[[0, 1, 2, 4]].tolist() == [95, 83, 42, 170]  # the sample's README counts
    assert np.isnan(labels[:, 3]).all()
    with open(root / readers.NIH_TABLE, newline="") as f:  # a direct reading of the table
        rows = {r[0]: r for r in csv.reader(f)}
    for src in sources[::97]:
        findings = rows[src.id.split("/")[1]][1].split("|")
        assert same(src.labels, [float(c in findings) for c in ("Atelectasis", "Cardiomegaly", "Consolidation")]
                    + [NAN, float("Effusion" in findings)])
        assert src.id.split("/")[0] == rows[src.id.split("/")[1]][3]
    patients = {split: {s.id.split("/")[0] for s in sources if s.split == split} for split in ("train", "test")}
    assert not patients["train"] & patients["test"] and len(patients["train"] | patients["test"]) == 264
    assert 0.1 < sum(s.split == "test" for s in sources) / 1000 < 0.3
    img = data.load_source(sources[0], readers.Options())
    assert img.shape == (1, 224, 224) and img.min() == -1 and img.max() == 1  # 64 x 64 RGB, grey -> 224, min-max


def test_nih_cache_takes_mimic_roles_in_probe(tmp_path):
    import probe
    rows = [(f"{p:08d}_000.png", "Effusion" if p % 2 else "No Finding", str(p)) for p in range(1, 21)]
    nih_tree(tmp_path / "nih", rows)
    cache = prepared("nih", tmp_path / "nih", tmp_path)
    sources = probe.resolve_sources([str(cache)], ["2D"])
    assert sorted(sources) == ["mimic", "train_2d"]
    assert sources["mimic"].split == "test" and sources["train_2d"].split == "train"
    assert sources["mimic"].title == "NIH ChestX-ray14 (internal test set)" and sources["mimic"].spec == str(cache)


# ---------------------------------------------------------------- DICOM

def write_dicom(path: Path, pixels: np.ndarray, *, series="1.2.826.0.1.3680043.8.498.1", modality="CT",
                position=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0), spacing=(0.5, 0.7), slope=1.0,
                intercept=-1024.0, instance=1, photometric="MONOCHROME2", patient="P1", syntax=None):
    """One synthetic DICOM file, written by pydicom with the geometry given (CT Image Storage or DX)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
    sop_class = CTImageStorage if modality in ("CT", "MR") else DigitalXRayImageStorageForPresentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID, series
    ds.Modality, ds.PatientID, ds.InstanceNumber = modality, patient, instance
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(position), list(orientation)
    ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = list(spacing), slope, intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if syntax is None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:
        ds.PixelData = pydicom.encaps.encapsulate([b"\0" * 16])
        ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# a volume in the project orientation: (Z, Y, X) superior->inferior, anterior->posterior, right->left, HU
TRUE_HU = (np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) * 7 - 1000)
GAP, ROW_MM, COL_MM = 1.0, 0.9, 0.7  # slice gap, distance between rows, between columns


def write_series(folder: Path, encoding: str, series: str, drop=(), skew_deg=0.0):
    """TRUE_HU stored as a DICOM series in one of several encodings of the same patient geometry (LPS mm).

    axial: IOP rows -> patient left, columns -> posterior (the usual); flipped: both reversed; feet-first: the
    column direction reversed, so the slice normal points to the feet. Files are named against the slice order
    and InstanceNumber is shuffled: neither may decide the order.
    """
    z_count, y_count, x_count = TRUE_HU.shape
    instances = np.random.default_rng(0).permutation(z_count) + 1
    for k in range(z_count):
        if k in drop:
            continue
        z = 100.0 - k * GAP  # superior first: k = 0 is the highest z (LPS: +z is superior)
        pixels = TRUE_HU[k]
        if encoding == "axial":
            iop, ipp = (1, 0, 0, 0, 1, 0), (-10.0, -20.0, z)
        elif encoding == "flipped":
            iop, ipp = (-1, 0, 0, 0, -1, 0), (-10.0 + (x_count - 1) * COL_MM, -20.0 + (y_count - 1) * ROW_MM, z)
            pixels = pixels[::-1, ::-1]
        elif encoding == "feet-first":
            iop, ipp = (1, 0, 0, 0, -1, 0), (-10.0, -20.0 + (y_count - 1) * ROW_MM, z)
            pixels = pixels[::-1]
        elif encoding == "oblique":  # rotated a few degrees about the patient's z axis: closest axes as axial
            c, s = np.cos(np.radians(skew_deg)), np.sin(np.radians(skew_deg))
            iop, ipp = (c, s, 0, -s, c, 0), (-10.0, -20.0, z)
        write_dicom(folder / f"IM{z_count - k:04d}", np.ascontiguousarray(pixels) + 1024, series=series,
                    position=ipp, orientation=iop, spacing=(ROW_MM, COL_MM), instance=int(instances[k]))


@pytest.mark.parametrize("encoding", ["axial", "flipped", "feet-first", "oblique"])
def test_dicom_ct_series_ordered_by_position_reoriented_like_nifti(tmp_path, encoding):
    write_series(tmp_path / "archive" / "study" / "series", encoding, "1.2.3.1", skew_deg=8.0)
    (tmp_path / "archive" / "README.txt").write_text("not a DICOM file")
    (src,) = readers.scan("dicom", tmp_path / "archive", opt())
    assert src.kind == "dicom-ct" and not src.problem and src.id == "P1/1.2.3.1" and len(src.files) == 5
    hu, spacing = readers.read_dicom_series(src.files)
    assert np.array_equal(hu, TRUE_HU)  # same patient geometry, whatever the encoding
    assert spacing == pytest.approx((GAP, ROW_MM, COL_MM))
    img = data.load_source(src, opt())
    assert img.shape == data.long_side_shape(TRUE_HU.shape, (GAP, ROW_MM, COL_MM), 28)
    assert np.allclose(img, data.preprocess_ct(TRUE_HU, (GAP, ROW_MM, COL_MM), 28, "x"))


def test_dicom_ct_series_in_a_nifti_file_gives_the_same_volume(tmp_path):
    """The DICOM reader's affine, written as NIfTI, read back by the NIfTI reader: one orientation path."""
    write_series(tmp_path / "dcm", "flipped", "1.2.3.2")
    (src,) = readers.scan("dicom", tmp_path / "dcm", opt())
    pydicom = pytest.importorskip("pydicom")
    slices = [pydicom.dcmread(p) for p in src.files]
    order, affine = readers.dicom_series_geometry(slices, "x")
    stack = np.stack([slices[i].pixel_array.astype(np.float32) - 1024 for i in order])
    nib.save(nib.Nifti1Image(stack, affine), tmp_path / "vol.nii.gz")
    hu, spacing = readers.read_nifti(str(tmp_path / "vol.nii.gz"))
    assert np.array_equal(hu, TRUE_HU) and spacing == pytest.approx((GAP, ROW_MM, COL_MM))


def test_dicom_series_that_are_no_volume_are_skipped_with_the_reason(tmp_path, capsys):
    root = tmp_path / "archive"
    write_series(root / "good", "axial", "1.2.3.10")
    write_dicom(root / "good" / "scout", TRUE_HU[0] + 1024, series="1.2.3.10", orientation=(0, 1, 0, 0, 0, -1))
    pydicom = pytest.importorskip("pydicom")
    scout = pydicom.dcmread(root / "good" / "scout")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]  # a scout filed in the series: left out, not fatal
    scout.save_as(root / "good" / "scout")
    write_series(root / "gap", "axial", "1.2.3.11", drop=(2,))
    write_dicom(root / "single" / "a", TRUE_HU[0] + 1024, series="1.2.3.12")
    write_dicom(root / "mr" / "a", TRUE_HU[0] + 1024, series="1.2.3.13", modality="MR")
    write_dicom(root / "mr" / "b", TRUE_HU[0] + 1024, series="1.2.3.13", modality="MR", position=(0, 0, 2))
    write_dicom(root / "sizes" / "a", TRUE_HU[0] + 1024, series="1.2.3.14")
    write_dicom(root / "sizes" / "b", TRUE_HU[0, :4] + 1024, series="1.2.3.14", position=(0, 0, 2))
    write_dicom(root / "xray" / "a", TRUE_HU[0] + 1024, series="1.2.3.15", modality="DX")
    write_series(root / "cut", "axial", "1.2.3.17")
    cut = sorted((root / "cut").iterdir())[2]
    cut.write_bytes(cut.read_bytes()[:-10])  # a download cut short: found from headers, before any decoding
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless
    jpegls = not get_decoder(JPEGLSLossless).is_available
    if jpegls:  # no JPEG-LS decoder here (pydicom alone): the series is refused by name
        for k in range(2):
            write_dicom(root / "jpegls" / f"{k}", TRUE_HU[0] + 1024, series="1.2.3.16", position=(0, 0, 2 * k),
                        syntax=JPEGLSLossless)
    reasons = {Path(s.path).name: s.problem for s in readers.scan("dicom", root, opt())}
    assert reasons["good"] == ""
    assert "uneven slice positions, gaps 1 to 2 mm (a missing slice?)" in reasons["gap"]
    assert "1 slice: not a volume" in reasons["single"]
    assert "modality MR" in reasons["mr"] and "mixed sizes" in reasons["sizes"]
    assert "DX radiograph: this run reads CT volumes" in reasons["a"]  # a radiograph is named by its file
    assert f"{cut}: truncated: its pixel data needs 84 bytes" in reasons["cut"]
    if jpegls:
        assert "JPEG-LS Lossless" in reasons["jpegls"] and "not installed" in reasons["jpegls"]
    out = tmp_path / "cache"
    summary = data.prepare("dicom", root, out, opt())
    assert summary["records"] == 1 and len(summary["failed"]) == len(reasons) - 1
    assert len(readers.scan("dicom", root / "good", opt())[0].files) == 5  # the scout is not a slice
    report = dict(line.split("\t") for line in (out / "report.tsv").read_text().splitlines())
    assert "uneven slice positions" in report[str(root / "gap")]
    ds = data.open_dataset(str(out), "train")
    assert ds.modality == "3d" and ds.ids == ["P1/1.2.3.10"] and np.isnan(ds.labels).all()


def test_dicom_radiograph_monochrome1_is_inverted(tmp_path):
    pixels = np.full((40, 30), 3000, np.uint16)  # MONOCHROME1: high values shown dark (air) ...
    pixels[10:30, 5:25] = 200                    # ... low values bright: the dense body
    write_dicom(tmp_path / "dx" / "m1", pixels, series="1.2.3.20", modality="DX", photometric="MONOCHROME1",
                slope=1.0, intercept=0.0)
    write_dicom(tmp_path / "dx" / "m2", 3200 - pixels, series="1.2.3.20", modality="DX", slope=1.0, intercept=0.0)
    sources = readers.scan("dicom", tmp_path / "dx", opt(dicom_modality="2d"))
    assert [s.kind for s in sources] == ["dicom-xray"] * 2 and not any(s.problem for s in sources)
    one, two = (data.load_source(s, opt(dicom_modality="2d")) for s in sources)
    assert np.array_equal(one, two)  # MONOCHROME1 inverted == the same image stored MONOCHROME2
    assert one.shape == (1, 28, 21) and one[0, 14, 10] == pytest.approx(1) and one[0, 0, 0] == pytest.approx(-1)
    (ct,) = readers.scan("dicom", tmp_path / "dx", opt())[:1]
    assert "this run reads CT volumes" in ct.problem


def test_dicom_real_series_equals_a_direct_reading_in_any_file_order(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    folder = real("ct-dicom/Lung_Dx-A0002-B40f")
    files = sorted(folder.iterdir())
    shuffled = tmp_path / "shuffled"  # links named against the slice order: a name says nothing
    shuffled.mkdir()
    for k, f in enumerate(files):
        (shuffled / f"slice{len(files) - k:02d}").symlink_to(f)
    (src,) = readers.scan("dicom", shuffled, opt())
    hu, spacing = readers.read_dicom_series(src.files)
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda d: -float(d.ImagePositionPatient[2]))  # axial, IOP (1,0,0,0,1,0): superior first
    direct = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    assert hu.shape == (30, 512, 512) and np.array_equal(hu, direct.astype(np.float32))
    assert spacing == pytest.approx((8.0, 0.646484375, 0.646484375))
    assert hu.min() == -1024 and 1000 < hu.max() < 3000  # HU: air outside the body, bone
    bone = np.argwhere(hu > 300)
    assert bone[:, 1].mean() > 300  # the spine is posterior: high Y (anterior -> posterior)
    body = hu > -300
    inside = np.maximum.accumulate(body, axis=2) & np.maximum.accumulate(body[..., ::-1], axis=2)[..., ::-1]
    lung = ((hu < -400) & inside).sum(axis=(1, 2))  # air between the body's walls, per slice
    assert lung[:3].max() < 0.5 * lung.max()  # the apices first: superior -> inferior
    liver = ((hu > 20) & (hu < 90))[-5:]  # the lowest slices: the liver dome, on the patient's right
    assert liver[..., :256].sum() > 1.3 * liver[..., 256:].sum()  # right -> left: the right is at low X


def test_dicom_without_pydicom_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as on a machine without the optional package
    (tmp_path / "archive").mkdir()
    with pytest.raises(ImportError, match="optional dependency: pip install pydicom"):
        readers.scan("dicom", tmp_path / "archive", opt())
    assert data.main(["check", "--dataset", "dicom", "--root", str(tmp_path / "archive")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install pydicom" in err  # one line, no traceback


def test_radchest_table_1_tests_on_every_split_and_table_2_on_the_test_split(tmp_path):
    import probe
    root = tmp_path / "radchest"
    root.mkdir()
    vol = np.full((20, 20, 20), -1000, np.int16)
    for split, prefix in (("imgtrain", "trn"), ("imgvalid", "val"), ("imgtest", "tst")):
        for k in range(2):
            np.savez_compressed(root / f"{prefix}{k:05d}.npz", ct=vol)
        write_csv(root / f"{split}_Abnormality_and_Location_Labels.csv",
                  ["NoteAcc_DEID", *[f"{c}*lung" for c in readers.RADCHEST_PREFIXES]],
                  [[f"{prefix}{k:05d}", k, 0, 1, 0, k] for k in range(2)])
    cache = str(prepared("radchest", root, tmp_path))
    sources = probe.resolve_sources([cache], [])
    assert sources["radchest"].split == data.ALL_SPLITS and sources["radchest_test"].split == "test"
    sets = probe.open_datasets(sources, None)
    assert sorted(sets["radchest"].ids) == sorted(f"{p}{k:05d}" for p in ("trn", "val", "tst") for k in range(2))
    assert sets["radchest_test"].ids == ["tst00000", "tst00001"] and sets["radchest_train"].ids == ["trn00000", "trn00001"]
    assert sets["radchest"].fingerprint != sets["radchest_test"].fingerprint  # features cached apart
    assert "all splits" in sources["radchest"].title


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_prepare_on_a_bad_root_is_one_line_and_leaves_no_out(tmp_path, capsys, case):
    root = tmp_path / "mimic"
    if case == "empty":
        root.mkdir()
    out = tmp_path / "cache"
    assert data.main(["prepare", "--dataset", "mimic", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("data.py prepare: error: ")
    assert (f"{root}: dataset root not found" if case == "missing" else
            f"{root / 'mimic-cxr-2.0.0-metadata.csv.gz'}: table not found") in err
    assert not out.exists()


def test_probe_feature_cache_key_covers_phantom_py(monkeypatch):
    """Cached features of phantom records must be recomputed when the generator changes, even at one PHANTOM_VERSION."""
    import inspect
    import features
    features.feature_code_digest.cache_clear()
    before = features.feature_code_digest()
    source = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: source(obj) + ("\n# edited" if obj is phantom else ""))
    features.feature_code_digest.cache_clear()
    try:
        assert features.feature_code_digest() != before
    finally:
        features.feature_code_digest.cache_clear()


def test_intensity_stats_are_the_mean_and_std_of_the_samples_read_directly():
    """train.py --standardize: over a dataset no larger than n, the statistics of every pixel of every sample."""
    ds = data.open_dataset("phantom3d", "train", n=5, size=28, seed=3)
    mean, std = data.intensity_stats(ds, n=64)
    pixels = np.concatenate([ds[i].image.ravel() for i in range(len(ds))])
    assert mean == pytest.approx(pixels.mean(), abs=1e-5) and std == pytest.approx(pixels.std(), rel=1e-4)
    assert -1 < mean < 0 < std < 1  # a windowed CT: mostly air and soft tissue below the window's level


def test_zoom_rescales_the_same_crops_each_by_its_own_factor_within_the_range():
    """--zoom Z: the crops are the default's (drawn before the factors), each rescaled by one factor in [1/Z, Z]
    per view and snapped to whole patches (a constant image stays that constant); views differ in scale."""
    rng_args = dict(patch=14, n_global=2, n_local=6)
    for shape in ((1, 112, 98), (56, 56, 42)):
        image = np.full(shape, 0.25, np.float32)
        native = make_views(image, np.random.default_rng(5), **rng_args)
        zoomed = make_views(image, np.random.default_rng(5), **rng_args, zoom=1.5)
        ratios = []
        for a, b in zip(native, zoomed):
            patched = slice(2, None) if shape[0] == 1 else slice(1, None)
            r = np.array(b.shape[patched]) / np.array(a.shape[patched])
            side = np.array(a.shape[patched])  # snapping moves a side by at most half a patch
            assert np.all(r >= (side / 1.5 - 7) / side - 1e-9) and np.all(r <= (side * 1.5 + 7) / side + 1e-9)
            assert all(n % 14 == 0 for n in b.shape[patched]) and torch.allclose(b, torch.tensor(0.25))
            ratios.append(r.mean())
        assert len(set(np.round(ratios, 3))) > 3  # the factor is drawn per view
    ramp = np.linspace(-1, 1, 56 * 56, dtype=np.float32).reshape(1, 56, 56)  # content, not only shape, is rescaled
    v = make_views(ramp, np.random.default_rng(1), patch=14, n_global=1, n_local=0, global_scale=(1, 1), zoom=2.0)[0]
    assert v.shape[-1] != 56 and abs(float(v.mean()) - float(ramp.mean())) < 0.05
    with pytest.raises(ValueError, match="zoom"):
        make_views(image, np.random.default_rng(5), **rng_args, zoom=0.8)
