"""Data for MultiMedVision (paper 2.4): readers for the paper's datasets, NIH
ChestX-ray14 and DICOM, the preprocessing shared by real images and phantom
chests (phantom.py renders them), a preprocessed cache, multi-crop views and
the mixed 2D/3D loader.

    python data.py check   --dataset mimic --root /data/mimic-cxr-jpg
    python data.py prepare --dataset mimic --root /data/mimic-cxr-jpg --out cache/mimic --workers 16
    python data.py prepare --dataset nih   --root /data/nih-cxr14 --out cache/nih     # public, labelled 2D
    python data.py prepare --dataset dicom --root /data/archive   --out cache/dicom   # CT series (pip install pydicom)
    python data.py prepare --dataset phantom --phantom phantom3d --n 512 --out cache/phantom3d

Every source yields a Record: image float32 (Z, H, W) in [-1, 1] (Z == 1 for a
2D image), the five LABELS as float32 with NaN where unknown, the modality and
a stable id (patient first, '/'-separated: "p10000032/s50414267").

Orientation: every 3D array is (Z, Y, X) with Z superior -> inferior,
Y anterior -> posterior, X patient right -> patient left: RAD-ChestCT's own
order. An axial slice then looks as radiologists display it, and projecting a
volume along Y gives a radiograph in the usual display (head up, patient right
on the viewer's left), which is how the phantom makes its 2D images. NIfTI
files with a trustworthy affine and DICOM series (their affine built from
ImagePositionPatient / ImageOrientationPatient) are reoriented by one function,
canonical_zyx; CT-RATE v1, whose headers are not trusted, by CTRATE_V1_AXES.

Preprocessing (paper 2.4): X-ray: grayscale, long side resized to 224,
min-max to [-1, 1]. CT: Hounsfield units, reoriented as above, resampled to
isotropic voxels with the voxel spacing (anatomy keeps its proportions),
long side 112, window L=250 W=2500 (HU -1000..1500) clipped to [-1, 1].

Cache (written by `prepare`, read by open_dataset):
    CACHE/index.json     {"format": 1, "name", "modality", "settings": {...},
                          "records": [{"key", "id", "split", "labels": [5 x float|null],
                                       "shape": [Z, H, W]}, ...], "n_failed"}
    CACHE/settings.json  the preprocessing settings; a rerun with others is refused
    CACHE/arrays/KEY.npy float16 (Z, H, W) in [-1, 1], memory-mapped when read
    CACHE/report.tsv     one line per raw file that could not be converted: path<TAB>error
Every file is written to a temporary name and renamed (atomic); a rerun
converts only what is missing.
"""
import argparse
import csv
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pack import Packed, pack
from phantom import PHANTOM_VERSION, PHANTOMS, phantom_rng, render, sample_patient

LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Lung Opacity", "Pleural Effusion")
XRAY_SIZE, CT_SIZE = 224, 112          # long side after preprocessing (paper 2.4)
WINDOW_LEVEL, WINDOW_WIDTH = 250.0, 2500.0  # CT window (paper 2.4)
PHANTOM_N = {"train": 1024, "test": 256}
CACHE_FORMAT = 1


@dataclass
class Record:
    image: np.ndarray   # float32 (Z, H, W) in [-1, 1], Z == 1 for 2D
    labels: np.ndarray  # float32 (5,), NaN unknown
    modality: str       # "2d" | "3d"
    id: str             # patient/study id, stable, used for splits and bootstrap


# ---------------------------------------------------------------- preprocessing

def window_ct(hu: np.ndarray) -> np.ndarray:
    """paper 2.4: window L=250, W=2500 -> [-1, 1] (HU -1000 -> -1, 250 -> 0, 1500 -> 1)."""
    lo = WINDOW_LEVEL - WINDOW_WIDTH / 2
    return np.clip((hu - lo) / WINDOW_WIDTH * 2 - 1, -1, 1).astype(np.float32)


def minmax(img: np.ndarray, where: str) -> np.ndarray:
    """paper 2.4: X-ray min-max to [-1, 1]."""
    lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        raise ValueError(f"{where}: constant image (all pixels {lo}), nothing to normalize")
    return ((img - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def long_side_shape(shape, spacing, size: int) -> tuple:
    """Output shape with the longest physical extent mapped to `size` voxels, isotropic."""
    extent = [n * s for n, s in zip(shape, spacing)]
    voxel = max(extent) / size
    return tuple(max(1, round(e / voxel)) for e in extent)


def preprocess_xray(img, size: int, where: str) -> np.ndarray:
    """PIL image (any mode) -> float32 (1, H, W) in [-1, 1], long side `size`."""
    from PIL import Image
    if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        img = img.convert("L")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"{where}: empty image {w}x{h}")
    new_h, new_w = long_side_shape((h, w), (1, 1), size)
    img = img.convert("F").resize((new_w, new_h), Image.BILINEAR)  # Pillow's resize is antialiased
    return minmax(np.asarray(img, dtype=np.float32), where)[None]


def resample_ct(hu: np.ndarray, spacing, size: int) -> np.ndarray:
    """(Z, Y, X) HU with voxel spacing (mm) -> isotropic voxels, long side `size`.

    Downsampling uses area averaging (no aliasing), upsampling trilinear.
    """
    shape = long_side_shape(hu.shape, spacing, size)
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    down = tuple(min(a, b) for a, b in zip(shape, hu.shape))
    if down != hu.shape:
        t = F.interpolate(t, size=down, mode="area")
    if shape != down:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


def preprocess_ct(hu: np.ndarray, spacing, size: int, where: str) -> np.ndarray:
    """(Z, Y, X) HU -> float32 (Z, Y, X) in [-1, 1]: resampled, long side `size`, windowed."""
    if hu.ndim != 3:
        raise ValueError(f"{where}: expected a (Z, Y, X) volume, got shape {hu.shape}")
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"{where}: invalid voxel spacing {spacing}")
    return window_ct(resample_ct(hu, spacing, size))


def validate_image(img: np.ndarray, where: str, min_side: int, is_3d: bool | None = None) -> np.ndarray:
    """Reject non-finite arrays and images with a patched side shorter than one patch.

    is_3d: what the dataset says the image is (None: Z > 1). A volume of one slice is refused, not
    taken for a radiograph: it would be cropped and packed as 2D under a 3D label.
    """
    if img.ndim != 3:
        raise ValueError(f"{where}: expected (Z, H, W), got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError(f"{where}: non-finite values")
    if is_3d and img.shape[0] < max(2, min_side):
        raise ValueError(f"{where}: a CT volume of {img.shape[0]} slice(s) {img.shape}: thinner than one patch")
    patched = img.shape if img.shape[0] > 1 else img.shape[1:]
    if min(patched) < min_side:
        raise ValueError(f"{where}: image {img.shape} is smaller than one {min_side}-pixel patch")
    return img


# ---------------------------------------------------------------- phantom chests (rendered by phantom.py)

def preprocess_phantom(raw: np.ndarray, modality: str, size: int) -> np.ndarray:
    """phantom.render's HU volume or line-integral radiograph -> float32 (Z, H, W) in [-1, 1], by the
    preprocessing of real images (paper 2.4). Rendered at the target size with isotropic voxels, so the
    resampling and resizing steps keep every value: phantom fingerprints are unchanged by this path."""
    if modality == "3d":
        return preprocess_ct(raw, (1.0, 1.0, 1.0), size, "phantom")
    from PIL import Image
    return preprocess_xray(Image.fromarray(raw), size, "phantom")


def phantom_record(name: str, split: str, index: int, size: int, seed: int) -> Record:
    """Sample `index` of a phantom split; rounded through float16 like a cache array."""
    rng = phantom_rng(name, split, index, seed)
    p = sample_patient(rng)
    modality = "3d" if "3d" in name else "2d"
    img = preprocess_phantom(render(p, rng, modality, size, name.endswith("-ext")), modality, size)
    return Record(_float32(img.astype(np.float16)), p["labels"], modality, f"{name}-{split}-{index:06d}")


# ---------------------------------------------------------------- raw datasets (see DATASETS.md)

MODALITY = {"mimic": "2d", "chexpert": "2d", "ctrate": "3d", "radchest": "3d", "nih": "2d", "dicom": "3d",
            "folder2d": "2d", "folder3d": "3d"}  # dicom: 3D (CT) by default, --dicom-modality 2d for radiographs
CTRATE_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Lung opacity", "Pleural effusion")
RADCHEST_PREFIXES = ("atelectasis", "cardiomegaly", "consolidation", "opacity", "pleural_effusion")
RADCHEST_SPLITS = {"trn": ("train", "imgtrain"), "val": ("valid", "imgvalid"), "tst": ("test", "imgtest")}
RADCHEST_SPACING = (0.8, 0.8, 0.8)  # mm, isotropic as released
# CT-RATE v1 arrays (i, j, k) run towards patient Left, Posterior, Superior: slice k = 0 is the most inferior.
# Evidence: CT-CLIP, trained on v1, feeds the stored array as (k, i, j) (scripts/data_inference_nii.py:
# transpose(2, 0, 1), no flip), and its released weights work on volumes reoriented to SLP+ (k -> Superior,
# i -> Left, j -> Posterior; CT-CLIP issue #41, torchio issue #1282); v2's corrected headers carry LPS codes.
CTRATE_V1_AXES = "LPS"
NIH_TABLE = "Data_Entry_2017_v2020.csv"  # the 2020 relabelled table; the 2017 original is read when it is alone
NIH_TABLE_2017 = "Data_Entry_2017.csv"
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", None, "Effusion")  # LABELS order; no Lung Opacity
NIH_SPLIT_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}  # the official patient-wise split
TEST_FRACTION = 0.2  # a split made here puts ~20% of the patients in test (paper 2.4.1: MIMIC 33,537 of 167,286)
# the paper's n per (dataset, split) (2.4.1; Table 1's RAD-ChestCT set is every split), printed beside check's counts
PAPER_N = {("mimic", "train"): 133_749, ("mimic", "test"): 33_537, ("chexpert", "test"): 668,
           ("ctrate", "train"): 46_394, ("ctrate", "valid"): 3_002, ("radchest", "all"): 3_630}


@dataclass
class Options:
    """How `prepare` and `check` read and preprocess a dataset (argparse fills it)."""
    size: int = 0                  # long side; 0: 224 for 2D, 112 for 3D (paper 2.4)
    min_side: int = 14             # reject an image whose patched side is shorter (one patch)
    uncertain: str = "nan"         # MIMIC / CheXpert label -1.0: nan | zero | one
    blank: str = "nan"             # label not mentioned (blank cell): nan | zero
    mimic_views: str = "PA,AP"     # MIMIC frontal views by preference; one image per study
    mimic_split: str = "paper"     # paper: patient-wise 80/20 by patient_split (paper 2.4.1) | official: split.csv.gz
    frontal_only: bool = False     # CheXpert: drop lateral views (the paper's n=668 keeps them)
    chexpert_table: str = ""       # CheXpert CSV; default: groundtruth.csv, test_labels.csv or test.csv
    ctrate_version: str = "auto"   # auto | 1 (train/, valid/) | 2 (train_fixed/, valid_fixed/)
    one_per_scan: bool = False     # CT-RATE: keep only the first reconstruction of each scan
    v1_flip: str = ""              # CT-RATE v1 (header ignored, axes CTRATE_V1_AXES): extra flips of (Z, Y, X)
    phantom: str = "phantom2d"     # phantom cache: which phantom
    n: int = 1024                  # phantom cache: train samples (test: n // 4)
    seed: int = 0                  # phantom cache: seed; patient splits made here (MIMIC paper, NIH): their seed
    dicom_modality: str = "3d"     # DICOM: 3d (CT series -> volumes) | 2d (CR/DX/DR files -> radiographs) | any (both)


@dataclass
class Source:
    """One raw file to convert, with everything known about it before decoding."""
    key: str                 # unique, file-name safe: the cache array is arrays/KEY.npy
    id: str
    split: str
    labels: np.ndarray
    path: str
    kind: str                # xray | nifti | npz | dicom-ct | dicom-xray | phantom
    rescale: tuple = None    # CT-RATE v1: (slope, intercept) from the metadata, header ignored
    spacing: tuple = None    # (z, y, x) mm from the metadata; None: from the file
    problem: str = ""        # known defect (e.g. no metadata row): reported as a failure
    files: tuple = ()        # DICOM CT: the files of the series (any order: read_dicom_series sorts them)


def read_table(path: Path, required) -> list:
    """Rows of a CSV (or .csv.gz) as dicts; names the file and column when one is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table not found")
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            return list(reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: unreadable table ({type(e).__name__}: {e})") from e


def parse_label(value: str, opt: Options, where: str = "label") -> float:
    """'1.0' positive, '0.0' negative, '-1.0' uncertain (opt.uncertain), '' not mentioned (opt.blank).

    Anything else is an error naming `where` (table, row, column): a label table is read whole, so a
    bad cell means a wrong file or column, not one bad sample to skip.
    """
    value = (value or "").strip()
    if value == "":
        return {"nan": math.nan, "zero": 0.0}[opt.blank]
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if x not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: label {value!r} is not 1, 0, -1 or blank")
    return {"nan": math.nan, "zero": 0.0, "one": 1.0}[opt.uncertain] if x == -1 else x


def _row_labels(row: dict, columns, opt: Options, where: str) -> np.ndarray:
    return np.array([parse_label(row[c], opt, f"{where}, column {c!r}") for c in columns], np.float32)


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not an integer id") from None


def _key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _nan_labels() -> np.ndarray:
    return np.full(len(LABELS), np.nan, np.float32)


def scan_mimic(root: Path, opt: Options) -> list:
    """MIMIC-CXR-JPG: one frontal image per study (opt.mimic_views by preference).

    Split (opt.mimic_split): "paper" (default), the paper's protocol (2.4.1: train n=133,749, internal test
    n=33,537, 20.0% of the studies): patient_split on subject_id, every study of a patient on one side. The
    official split's train, validate and test studies all go where their patient falls: the paper's two
    counts add up to every frontal study it used, none held out for validation (the probe chooses C on
    held-out train patients itself), and the official test part is only ~2% of the studies. "official":
    mimic-cxr-2.0.0-split.csv.gz as published (train / validate / test).
    A study without a row in the label table is reported (skipped), not given unknown labels.
    """
    if opt.mimic_split not in ("paper", "official"):
        raise ValueError(f"--mimic-split must be 'paper' or 'official', got {opt.mimic_split!r}")
    meta = read_table(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    table = read_table(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *LABELS])
    split_table = root / "mimic-cxr-2.0.0-split.csv.gz"
    split_of = ({r["dicom_id"]: r["split"] for r in read_table(split_table, ["dicom_id", "split"])}
                if opt.mimic_split == "official" else {})
    labels_of = {}
    for n, r in enumerate(table):
        where = f"{root / 'mimic-cxr-2.0.0-chexpert.csv.gz'} row {n + 2}"
        labels_of[_int(r["subject_id"], where), _int(r["study_id"], where)] = _row_labels(r, LABELS, opt, where)
    views = [v.strip().upper() for v in opt.mimic_views.split(",")]
    best = {}  # (subject, study) -> ((view rank, dicom_id), row)
    for n, r in enumerate(meta):
        view = (r["ViewPosition"] or "").strip().upper()
        if view in views:
            where = f"{root / 'mimic-cxr-2.0.0-metadata.csv.gz'} row {n + 2}"
            study, rank = (_int(r["subject_id"], where), _int(r["study_id"], where)), (views.index(view), r["dicom_id"])
            if study not in best or rank < best[study][0]:
                best[study] = (rank, r)
    sources = []
    for (subject, study), (_, r) in sorted(best.items()):
        dicom = r["dicom_id"]
        path = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        split = split_of.get(dicom, "") if opt.mimic_split == "official" else patient_split(f"p{subject}", opt.seed)
        problem = "" if split else f"dicom_id {dicom} not in {split_table}"
        if (subject, study) not in labels_of:
            problem = f"study s{study} of p{subject} has no row in {root / 'mimic-cxr-2.0.0-chexpert.csv.gz'}"
        sources.append(Source(_key(dicom), f"p{subject}/s{study}", split, labels_of.get((subject, study), _nan_labels()),
                              str(path), "xray", problem=problem))
    return sources


def patient_split(patient: str, seed: int, test_fraction: float = TEST_FRACTION) -> str:
    """'train' or 'test' for a patient, from a hash of (seed, patient id): every study of a patient on one side,
    and a patient keeps its side when the tree grows or shrinks (no permutation of a list that could shift)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}/{patient}".encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2 ** 64 else "train"


def scan_nih(root: Path, opt: Options) -> list:
    """NIH ChestX-ray14: Data_Entry table, images under images_NNN/images/ or one flat images/ folder.

    Labels from `Finding Labels` ('|'-separated): a finding not named is negative, Effusion is Pleural
    Effusion, Lung Opacity is unknown (no such label). Split: the official lists when both are there,
    else patient_split on `Patient ID`. Ids: 'PatientID/Image Index'.
    """
    table = root / NIH_TABLE
    if not table.is_file() and (root / NIH_TABLE_2017).is_file():
        table = root / NIH_TABLE_2017
    rows = read_table(table, ["Image Index", "Finding Labels", "Patient ID"])
    lists = {split: root / name for split, name in NIH_SPLIT_LISTS.items()}
    present = [p for p in lists.values() if p.is_file()]
    if len(present) == 1:
        missing = next(p for p in lists.values() if not p.is_file())
        raise FileNotFoundError(f"{missing}: not found beside {present[0]} (give both official split lists or none)")
    split_of = {}
    for split, path in (lists.items() if present else ()):
        split_of.update((line.strip(), split) for line in path.read_text().splitlines() if line.strip())
    images = {p.name: p for p in root.rglob("*.png")}  # images_001/images/ ... images_012/images/, or images/
    sources = []
    for n, r in enumerate(rows):
        where = f"{table} row {n + 2}"
        name, patient = r["Image Index"].strip(), r["Patient ID"].strip()
        findings = {f.strip() for f in (r["Finding Labels"] or "").split("|")}
        unknown = findings - {*NIH_FINDINGS, "No Finding"}
        if unknown or ("No Finding" in findings and len(findings) > 1):
            raise ValueError(f"{where}: Finding Labels {r['Finding Labels']!r} is not 'No Finding' or "
                             f"'|'-separated findings among {NIH_FINDINGS}")
        if not name or not patient:
            raise ValueError(f"{where}: empty Image Index or Patient ID")
        labels = np.array([float(c in findings) if c else math.nan for c in NIH_COLUMNS], np.float32)
        split = split_of.get(name, "") if present else patient_split(patient, opt.seed)
        path, problem = images.get(name), ""
        if path is None:
            path, problem = root / "images" / name, f"{name} (row {n + 2} of {table}) not found under {root}"
        elif not split:
            problem = f"{name} is in neither {lists['train'].name} nor {lists['test'].name}"
        sources.append(Source(_key(Path(name).stem), f"{patient}/{name}", split, labels, str(path), "xray",
                              problem=problem))
    return sources


def _resolve(root: Path, rel: str) -> Path:
    """A path from a CheXpert table ('CheXpert-v1.0/test/...') under root, dropping leading folders."""
    parts = Path(rel.strip()).parts
    for i in range(len(parts)):
        if (root.joinpath(*parts[i:])).exists():
            return root.joinpath(*parts[i:])
    cut = next((i for i, p in enumerate(parts) if p in ("test", "valid", "train")), 0)
    return root.joinpath(*parts[cut:])


def scan_chexpert(root: Path, opt: Options) -> list:
    """CheXpert test: study-level labels (`Study` column) or image-level (`Path` column)."""
    names = [opt.chexpert_table] if opt.chexpert_table else ["groundtruth.csv", "test_labels.csv", "test.csv"]
    table = next((root / n for n in names if (root / n).is_file()), None)
    if table is None:
        raise FileNotFoundError(f"{root}: no label table ({' or '.join(names)})")
    rows = read_table(table, LABELS)
    column = "Study" if rows and "Study" in rows[0] else "Path"
    if rows and column not in rows[0]:
        raise ValueError(f"{table}: missing column 'Study' or 'Path'; found {list(rows[0])}")
    sources = []
    for n, r in enumerate(rows):
        labels = _row_labels(r, LABELS, opt, f"{table} row {n + 2}")
        where = _resolve(root, r[column])
        paths = sorted(where.glob("*.jpg")) if column == "Study" else [where]
        if column == "Study" and not paths:
            sources.append(Source(_key(r[column]), r[column], "test", labels, str(where), "xray",
                                  problem="study folder has no .jpg image"))
        for path in paths:
            if opt.frontal_only and "lateral" in path.name.lower():
                continue
            rid = "/".join([*path.parent.parts[-2:], path.stem])
            # from the table's own path, not the absolute one: a root like /data/train/chexpert is no train split
            split = next((p for p in ("train", "valid") if p in Path(r[column]).parts), "test")
            sources.append(Source(_key(rid), rid, split, labels, str(path), "xray"))
    return sources


def _floats(text: str) -> list:
    return [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(text))]


def scan_ctrate(root: Path, opt: Options) -> list:
    """CT-RATE v1 (HU from metadata slope/intercept, header ignored) or v2 (*_fixed, HU in the file)."""
    ds = _ctrate_dir(root)
    if set(opt.v1_flip) - set("zyx"):
        raise ValueError(f"--v1-flip takes axes among 'zyx', got {opt.v1_flip!r}")
    version = ctrate_version(ds, opt)
    spacing_cols = ["VolumeName", "XYSpacing", "ZSpacing"]
    sources, found = [], []
    for split, meta_name in (("train", "train"), ("valid", "validation")):
        folder = ds / (f"{split}_fixed" if version == "2" else split)
        if not folder.is_dir():
            continue
        found.append(folder)
        table = read_table(ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName", *CTRATE_COLUMNS])
        table_path = ds / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
        labels_of = {r["VolumeName"]: _row_labels(r, CTRATE_COLUMNS, opt, f"{table_path} row {n + 2}")
                     for n, r in enumerate(table)}
        meta_path = ds / "metadata" / f"{meta_name}_metadata.csv"
        meta = {}  # v1 only: v2's header holds HU and the geometry, and its spacing is the one its affine was made with
        if version == "1":
            meta = {r["VolumeName"]: r for r in read_table(meta_path, spacing_cols + ["RescaleSlope", "RescaleIntercept"])}
        kept = {}
        for path in sorted(folder.rglob("*.nii.gz")):
            name, stem = path.name, path.name[: -len(".nii.gz")]
            parts = stem.split("_")  # split, patient, scan, reconstruction
            scan = "_".join(parts[:3])
            if opt.one_per_scan and scan in kept:
                continue
            kept[scan] = True
            row = meta.get(name)
            src = Source(_key(stem), f"{'_'.join(parts[:2])}/{stem}", split, labels_of.get(name, _nan_labels()),
                         str(path), "nifti")
            if row is not None:
                try:  # one bad row is this volume's problem (skipped, reported), not the whole scan's
                    xy = _floats(row["XYSpacing"])
                    src.spacing = (float(row["ZSpacing"]), xy[0], xy[-1])
                    src.rescale = (float(row["RescaleSlope"]), float(row["RescaleIntercept"]))
                except (ValueError, IndexError) as e:
                    src.problem = f"bad spacing or rescale for {name} in {meta_path}: {e or 'empty'}"
            elif version == "1":
                src.problem = f"no row for {name} in {meta_path} (v1 needs its RescaleSlope/Intercept and spacing)"
            sources.append(src)
    if not found:
        raise FileNotFoundError(f"{ds}: no CT-RATE volume folder (v1: train/, valid/; v2: train_fixed/, valid_fixed/)")
    return sources


def _ctrate_dir(root: Path) -> Path:
    return root / "dataset" if (root / "dataset").is_dir() else root


def ctrate_version(ds: Path, opt: Options) -> str:
    """'1' or '2': --ctrate-version, or auto from the folders (v2: *_fixed/), refusing a mix of versions."""
    if opt.ctrate_version != "auto":
        return opt.ctrate_version
    v2 = [s for s in ("train", "valid") if (ds / f"{s}_fixed").is_dir()]
    v1_only = [s for s in ("train", "valid") if (ds / s).is_dir() and s not in v2]
    if v2 and v1_only:
        raise ValueError(f"{ds}: {', '.join(s + '_fixed/' for s in v2)} (v2) beside {', '.join(s + '/' for s in v1_only)} "
                         f"(v1 only): auto would drop the v1 split; pass --ctrate-version 1 or 2")
    return "2" if v2 else "1"


def scan_radchest(root: Path, opt: Options) -> list:
    """RAD-ChestCT: {trn,val,tst}NNNNN.npz; label = max over columns 'abnormality*location' by exact prefix."""
    files = sorted(p for p in root.rglob("*.npz") if re.fullmatch(r"(trn|val|tst)\d+", p.stem))
    if not files:
        raise FileNotFoundError(f"{root}: no RAD-ChestCT volumes (trnNNNNN.npz, valNNNNN.npz, tstNNNNN.npz)")
    labels_of = {}
    for prefix in sorted({p.stem[:3] for p in files}):
        name = f"{RADCHEST_SPLITS[prefix][1]}_Abnormality_and_Location_Labels.csv"
        table = next(root.rglob(name), root / name)  # at the root or anywhere below it
        rows = read_table(table, ["NoteAcc_DEID"])
        columns = list(rows[0]) if rows else []
        groups = []
        for label, want in zip(LABELS, RADCHEST_PREFIXES):
            cols = [c for c in columns if c.split("*")[0] == want]  # exact prefix, never a substring
            if not cols:
                raise ValueError(f"{table}: no column '{want}*<location>' for {label}")
            groups.append(cols)
        for n, r in enumerate(rows):
            labels_of[r["NoteAcc_DEID"]] = np.array([max(_radchest_cell(r[c], f"{table} row {n + 2}, column {c!r}")
                                                         for c in cols) for cols in groups], np.float32)
    return [Source(_key(p.stem), p.stem, RADCHEST_SPLITS[p.stem[:3]][0], labels_of.get(p.stem, _nan_labels()),
                   str(p), "npz") for p in files]


def _radchest_cell(value: str, where: str) -> float:
    value = (value or "0").strip() or "0"
    if value not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"{where}: label {value!r} is not 0 or 1")
    return float(value)


def scan_folder(root: Path, modality: str) -> list:
    """Unlabelled images (PNG/JPG) or volumes (NIfTI) anywhere under root; split 'train'."""
    exts = (".png", ".jpg", ".jpeg") if modality == "2d" else (".nii", ".nii.gz")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(exts))
    sources = []
    for p in files:
        rid = p.relative_to(root).as_posix()
        rid = rid[: -len(next(e for e in exts if rid.lower().endswith(e)))]
        sources.append(Source(_key(rid), rid, "train", _nan_labels(), str(p), "xray" if modality == "2d" else "nifti"))
    return sources


DICOM_XRAY = ("CR", "DX", "DR")  # radiograph modalities (DR is no DICOM code, but archives write it)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError("reading DICOM needs pydicom, an optional dependency: pip install pydicom") from None
    if int(pydicom.__version__.split(".")[0]) < 3:  # pydicom.pixels (decoder lookup) is new in 3.0
        raise ImportError(f"reading DICOM needs pydicom >= 3.0, found {pydicom.__version__}: pip install -U pydicom")
    return pydicom


def _decoder_problem(ds) -> str:
    """'' if this file's pixel data can be decoded here, else why not (a compressed syntax without a decoder)."""
    from pydicom.pixels import get_decoder
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return ""  # no file meta: pydicom assumes implicit little endian, decodable
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"transfer syntax {syntax.name} ({syntax}) cannot be decoded by pydicom"
    if not decoder.is_available:
        return (f"transfer syntax {syntax.name} ({syntax}) needs a decoder that is not installed: "
                f"{'; '.join(decoder.missing_dependencies)}")
    return ""


def _truncation_problem(path: Path, ds) -> str:
    """'' unless the file ends before its pixel data does (a cut download): found from the headers alone."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    if elem is None:
        return f"{path}: no pixel data"
    if getattr(elem, "length", 0xFFFFFFFF) == 0xFFFFFFFF or getattr(elem, "value_tell", None) is None:
        return ""  # encapsulated (compressed) or already read: nothing to compare without decoding
    size = path.stat().st_size
    if elem.value_tell + elem.length > size:
        return (f"{path}: truncated: its pixel data needs {elem.length} bytes from byte {elem.value_tell}, "
                f"the file has {size}")
    return ""


def dicom_series_geometry(headers: list, where: str):
    """Slice order and affine of a CT series from its headers (paper 2.4: CT in its true geometry).

    Slices are ordered by ImagePositionPatient projected on the slice normal (row x column direction of
    ImageOrientationPatient), never by file name or InstanceNumber. Returns (order, affine): order indexes
    headers, affine (4, 4) maps the stacked (slice, row, column) indices to RAS+ millimetres, which is what
    canonical_zyx (shared with NIfTI) reorients. A series that is no regular volume is a ValueError.
    """
    if len(headers) < 2:
        raise ValueError(f"{where}: {len(headers)} slice: not a volume")
    frames = [int(h.get("NumberOfFrames", 1) or 1) for h in headers]
    if max(frames) > 1:
        raise ValueError(f"{where}: multi-frame file(s) ({max(frames)} frames): only one slice per file is read")
    need = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    lacking = sorted({k for h in headers for k in need if h.get(k) is None})
    if lacking:
        raise ValueError(f"{where}: slice(s) without {lacking}: the geometry is unknown")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise ValueError(f"{where}: slices of mixed sizes {sorted(sizes)}")
    iop = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(iop - iop[0]).max() > 1e-4:
        raise ValueError(f"{where}: slices with different ImageOrientationPatient")
    spacing = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
    if np.abs(spacing - spacing[0]).max() > 1e-4:
        raise ValueError(f"{where}: slices with different PixelSpacing")
    row_dir, col_dir = iop[0, :3], iop[0, 3:]  # LPS directions of increasing column index, row index
    normal = np.cross(row_dir, col_dir)
    position = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    depth = position @ normal
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    if gaps.min() < 1e-3:
        raise ValueError(f"{where}: two slices at the same position ({depth[order][np.argmin(gaps)]:.2f} mm "
                         f"along the normal): several acquisitions in one series?")
    gap = float(np.median(gaps))
    if gaps.max() - gaps.min() > max(0.01 * gap, 1e-3):
        raise ValueError(f"{where}: uneven slice positions, gaps {gaps.min():.3g} to {gaps.max():.3g} mm "
                         f"(a missing slice?)")
    in_plane = position[order] - np.outer(depth[order], normal)
    if np.abs(in_plane - in_plane[0]).max() > 0.5 * spacing[0].min():
        raise ValueError(f"{where}: slice positions drift in-plane (gantry tilt?): not a regular volume")
    lps = np.eye(4)
    lps[:3, 0] = normal * gap           # slice index: along the normal, in sorted order
    lps[:3, 1] = col_dir * spacing[0, 0]  # row index: PixelSpacing[0] is the distance between rows
    lps[:3, 2] = row_dir * spacing[0, 1]  # column index: PixelSpacing[1], between columns
    lps[:3, 3] = position[order[0]]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS


def read_dicom_series(paths) -> tuple:
    """The files of one CT series -> ((Z, Y, X) HU float32 in the project orientation, spacing (z, y, x) mm).

    HU = RescaleSlope * stored + RescaleIntercept, per slice (they may differ between slices).
    """
    pydicom = _pydicom()
    import nibabel as nib
    where = f"{Path(paths[0]).parent} (series of {len(paths)} files)"
    slices = [pydicom.dcmread(p) for p in paths]
    order, affine = dicom_series_geometry(slices, where)
    hu = np.empty((len(slices), int(slices[0].Rows), int(slices[0].Columns)), np.float32)
    for k, i in enumerate(order):
        ds = slices[i]
        problem = _decoder_problem(ds)
        if problem:
            raise ValueError(f"{paths[i]}: {problem}")
        hu[k] = ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    return canonical_zyx(nib.Nifti1Image(hu, affine))


def read_dicom_xray(path: str) -> np.ndarray:
    """One CR/DX radiograph -> float32 (H, W), bright = dense as in the JPG datasets: MONOCHROME1 (bright =
    low attenuation) is inverted."""
    ds = _pydicom().dcmread(path)
    problem = _decoder_problem(ds)
    if problem:
        raise ValueError(f"{path}: {problem}")
    img = ds.pixel_array.astype(np.float32)
    if img.ndim != 2:
        raise ValueError(f"{path}: pixel array of shape {img.shape}, expected one grayscale image")
    img = img * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        img = img.max() + img.min() - img
    return img


def scan_dicom(root: Path, opt: Options) -> list:
    """DICOM files anywhere under root (any name, with or without .dcm), grouped by SeriesInstanceUID.

    --dicom-modality 3d: each CT series is one volume; 2d: each CR/DX/DR file is one radiograph; any (probe.py
    embed): both. Series of the other kind, other modalities and series that are no regular volume are Sources with a problem
    (skipped and reported by check and prepare). Files that are not DICOM images are ignored.
    """
    pydicom = _pydicom()
    series = {}  # SeriesInstanceUID -> [(path, header)]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, defer_size=1024)  # headers; the pixel data is only located, not read
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue  # not DICOM (or not parseable as such): notes, DICOMDIR siblings, ...
        if "Rows" not in ds:
            continue  # no image (DICOMDIR, structured report, presentation state)
        series.setdefault(str(ds.get("SeriesInstanceUID", f"(no series uid) {path}")), []).append((path, ds))
    per_folder = {}
    for files in series.values():
        per_folder[files[0][0].parent] = per_folder.get(files[0][0].parent, 0) + 1
    sources = []
    for uid, files in series.items():
        first = files[0][1]
        patient = _key(str(first.get("PatientID", "") or "unknown"))
        modality = str(first.get("Modality", "")).upper()
        folder = files[0][0].parent
        where = str(folder) if per_folder[folder] == 1 else f"{folder} [series {uid}]"
        if modality in DICOM_XRAY:
            for path, ds in files:
                sop = str(ds.get("SOPInstanceUID", path.name))
                problem = (f"{modality} radiograph: this run reads CT volumes (--dicom-modality 2d reads it)"
                           if opt.dicom_modality == "3d" else _truncation_problem(path, ds) or _decoder_problem(ds))  # 2d, any
                sources.append(Source(_key(sop), f"{patient}/{sop}", "train", _nan_labels(), str(path), "dicom-xray",
                                      problem=problem))
            continue
        problem = ""
        if modality != "CT":
            problem = f"modality {modality or '(none)'}: only CT series and CR/DX/DR radiographs are read"
        elif opt.dicom_modality == "2d":
            problem = "CT series: this run reads radiographs (--dicom-modality 3d reads it)"
        else:  # a scout (localizer) filed in the series is no slice of the volume
            files = [(p, h) for p, h in files if "LOCALIZER" not in [str(v).upper() for v in h.get("ImageType", [])]]
            try:
                dicom_series_geometry([h for _, h in files], f"{len(files)} files")
                cut = [_truncation_problem(p, h) for p, h in files]
                problem = next((c for c in cut if c), "") or _decoder_problem(first)
            except ValueError as e:
                problem = str(e)
        sources.append(Source(_key(uid), f"{patient}/{uid}", "train", _nan_labels(), where, "dicom-ct",
                              problem=problem, files=tuple(str(p) for p, _ in files)))
    return sources


def scan_phantom(opt: Options) -> list:
    if opt.phantom not in PHANTOMS:
        raise ValueError(f"--phantom must be one of {PHANTOMS}, got {opt.phantom!r}")
    ds = {s: PhantomDataset(opt.phantom, s, n=n, size=opt.size or None, seed=opt.seed)
          for s, n in (("train", opt.n), ("test", max(1, opt.n // 4)))}
    return [Source(_key(d.ids[i]), d.ids[i], s, d.labels[i], f"{opt.phantom}/{s}/{i}", "phantom")
            for s, d in ds.items() for i in range(len(d))]


def dataset_modality(name: str, opt: Options) -> str:
    if name == "phantom":
        return "3d" if "3d" in opt.phantom else "2d"
    return opt.dicom_modality if name == "dicom" else MODALITY[name]


def scan(name: str, root, opt: Options) -> list:
    """All Sources of a dataset; errors name the missing root, table or column."""
    if name == "phantom":
        return scan_phantom(opt)
    if name not in MODALITY:
        raise ValueError(f"unknown dataset {name!r}; one of {sorted(MODALITY)} or 'phantom'")
    root = Path(root or "")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found")
    if name.startswith("folder"):
        return scan_folder(root, MODALITY[name])
    return {"mimic": scan_mimic, "chexpert": scan_chexpert, "ctrate": scan_ctrate, "radchest": scan_radchest,
            "nih": scan_nih, "dicom": scan_dicom}[name](root, opt)


def read_nifti(path: str, rescale=None, flip: str = ""):
    """NIfTI -> ((Z, Y, X) HU float32, header spacing (z, y, x) mm) in the project orientation.

    With a trustworthy affine (rescale None): reoriented to RAS+ by nibabel
    (axis 0 -> patient right, 1 -> anterior, 2 -> superior), header scaling
    applied, then every axis reversed and transposed to (Z, Y, X).
    CT-RATE v1 (rescale = (slope, intercept)): header scaling and affine are
    ignored; HU = slope * stored + intercept, and the stored axes (i, j, k) are
    taken to run towards patient Left, Posterior, Superior (CTRATE_V1_AXES), as
    v2's corrected affines say of the same arrays; `flip` reverses axes of the
    result, for a copy that differs.
    """
    import nibabel as nib
    img = nib.load(path)
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {img.shape}")
    if rescale is None:
        return canonical_zyx(img)
    # (i, j, k) = (L, P, S) -> (k, j, i) = (S, P, L), then Z reversed: superior -> inferior, as v2 and RAD-ChestCT
    vol = (img.dataobj.get_unscaled().astype(np.float32) * rescale[0] + rescale[1]).transpose(2, 1, 0)[::-1]
    for axis in flip:
        vol = np.flip(vol, "zyx".index(axis))
    return vol, tuple(float(s) for s in img.header.get_zooms()[:3][::-1])


def canonical_zyx(img):
    """A nibabel image with a trustworthy affine -> ((Z, Y, X) float32, spacing (z, y, x) mm) in the project
    orientation: nibabel's closest RAS+ (axis 0 -> patient right, 1 -> anterior, 2 -> superior), every axis
    reversed and transposed. NIfTI files and DICOM series (their affine built from the headers) share it."""
    import nibabel as nib
    img = nib.as_closest_canonical(img)
    vol = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[::-1, ::-1, ::-1]
    return vol, tuple(float(s) for s in img.header.get_zooms()[:3][::-1])


def read_radchest(path: str, header_only: bool = False):
    """The `ct` array of a RAD-ChestCT .npz (int16 HU, (Z, Y, X) as stored); None with header_only."""
    with np.load(path) as z:
        if "ct" not in z.files:
            raise ValueError(f"{path}: no 'ct' array (found {z.files})")
        return None if header_only else z["ct"]


def load_source(src: Source, opt: Options) -> np.ndarray:
    """Decode and preprocess one raw file -> float32 (Z, H, W) in [-1, 1], validated."""
    if src.problem:
        raise ValueError(f"{src.path}: {src.problem}")
    size = opt.size or (XRAY_SIZE if src.kind in ("xray", "dicom-xray") or src.path.startswith("phantom2d") else CT_SIZE)
    if src.kind == "xray":
        from PIL import Image
        with Image.open(src.path) as im:
            scale = size / max(im.size)
            im.draft("L", (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))  # JPEG: decode at reduced size
            img = preprocess_xray(im, size, src.path)
    elif src.kind == "nifti":
        hu, spacing = read_nifti(src.path, src.rescale, opt.v1_flip if src.rescale else "")
        img = preprocess_ct(hu, src.spacing or spacing, size, src.path)
    elif src.kind == "npz":
        hu = read_radchest(src.path).astype(np.float32)
        img = preprocess_ct(hu, RADCHEST_SPACING, size, src.path)
    elif src.kind == "dicom-ct":
        hu, spacing = read_dicom_series(src.files)
        img = preprocess_ct(hu, spacing, size, src.path)
    elif src.kind == "dicom-xray":
        from PIL import Image
        img = preprocess_xray(Image.fromarray(read_dicom_xray(src.path)), size, src.path)
    else:
        name, split, index = src.path.split("/")
        img = phantom_record(name, split, int(index), size, opt.seed).image
    is_3d = src.kind in ("nifti", "npz", "dicom-ct") or src.path.startswith("phantom3d")
    return validate_image(img, src.path, opt.min_side, is_3d=is_3d)


# ---------------------------------------------------------------- cache: prepare and read

def atomic_write(path, write) -> None:
    """write(f) into a temporary binary file next to path, then rename: a reader never sees half a file.

    Every file the project writes goes through here (cache, checkpoints, logs' config, tables, figures).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash never leaves an empty file under the name
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves nothing behind
        raise


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _float32(arr: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch (several times faster than numpy's conversion)."""
    return torch.from_numpy(np.array(arr, dtype=np.float16)).float().numpy()


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _npy_shape(path: Path):
    """Shape of a complete .npy file, None if it is missing or unreadable."""
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError, EOFError):
        return None


def _convert(task):
    """Worker: decode, preprocess and store one source; never raises."""
    i, src, opt, path = task
    try:
        img = load_source(src, opt)
        atomic_write(path, lambda f: np.save(f, img.astype(np.float16)))
        return i, img.shape, None
    except Exception as e:  # a corrupt file is reported, not fatal
        return i, None, f"{type(e).__name__}: {e}".replace("\n", " ")


def _init_worker():
    torch.set_num_threads(1)


def prepare(name: str, root, out, opt: Options, workers: int = 1) -> dict:
    """Convert a raw dataset into a cache (see the module docstring); resumable.

    Returns {"converted", "reused", "failed": [(path, error)], "records"}.
    """
    sources = scan(name, root, opt)
    if not sources:
        raise FileNotFoundError(f"{root}: no {name} images found")
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"{root}: several files map to the same cache key, e.g. {dup}")
    modality = dataset_modality(name, opt)
    extra = {}
    if name == "ctrate":  # the version read, not "auto": v1 and v2 arrays share file names but not HU
        opt = replace(opt, ctrate_version=ctrate_version(_ctrate_dir(Path(root)), opt))
        if opt.ctrate_version == "1":  # a v1 cache made under another reading of its axes is refused, not reused
            extra["ctrate_v1_axes"] = CTRATE_V1_AXES
    out = Path(out)
    (out / "arrays").mkdir(parents=True, exist_ok=True)
    settings = {"dataset": name, "modality": modality, **asdict(opt),
                "size": opt.size or (CT_SIZE if modality == "3d" else XRAY_SIZE),
                "window": [WINDOW_LEVEL, WINDOW_WIDTH], "dtype": "float16",
                "orientation": "(Z, Y, X): superior->inferior, anterior->posterior, right->left", **extra}
    if (out / "settings.json").is_file():
        old = json.loads((out / "settings.json").read_text())
        if old != json.loads(json.dumps(settings)):
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{out}: prepared with other settings {diff}; use a new --out")
    else:
        _write_json(out / "settings.json", settings)
    shapes, todo = {}, []
    for i, src in enumerate(sources):
        path = out / "arrays" / f"{src.key}.npy"
        shapes[i] = _npy_shape(path)
        if shapes[i] is None:
            todo.append((i, src, opt, path))
    reused = len(sources) - len(todo)
    failed = []
    parallel = workers > 1 and len(todo) > 1
    with (multiprocessing.Pool(workers, initializer=_init_worker) if parallel else nullcontext()) as pool, \
            tqdm(total=len(todo), desc=f"prepare {name}", unit="file", disable=None if todo else True) as bar:  # None: no bar in a log file
        for i, shape, error in (pool.imap_unordered(_convert, todo) if parallel else map(_convert, todo)):
            shapes[i] = shape
            if error:
                failed.append((sources[i].path, error))
            bar.update(1)
            bar.set_postfix(failed=len(failed), refresh=False)
    failed.sort()
    atomic_write(out / "report.tsv", lambda f: f.write("".join(f"{p}\t{e}\n" for p, e in failed).encode()))
    records = [{"key": s.key, "id": s.id, "split": s.split, "shape": list(shapes[i]),
                "labels": [None if math.isnan(v) else float(v) for v in s.labels]}
               for i, s in enumerate(sources) if shapes[i] is not None]
    if not records:
        raise RuntimeError(f"{root}: nothing usable: all {len(sources)} files failed, e.g. {failed[0][1]} "
                           f"(all listed in {out / 'report.tsv'})")
    index_name = opt.phantom if name == "phantom" else name
    _write_json(out / "index.json", {"format": CACHE_FORMAT, "name": index_name, "modality": modality,
                                     "settings": settings, "records": records, "n_failed": len(failed)})
    summary = {"converted": len(todo) - len(failed), "reused": reused, "failed": failed, "records": len(records)}
    print(f"{out}: {len(records)} records ({summary['converted']} converted, {reused} already done), "
          f"{len(failed)} failed" + (f" (listed in {out / 'report.tsv'})" if failed else ""))
    return summary


SPLIT_ORDER = ("train", "validate", "valid", "test")


def _read_index(root: Path) -> dict:
    root = Path(root)
    path = root / "index.json"
    if not path.is_file():
        make = f"make one with `python data.py prepare`, or name a phantom {PHANTOMS}"
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder ({make})")
        if not root.is_dir():
            raise ValueError(f"{root}: a file, not a cache folder ({make})")
        if not any(root.iterdir()):
            raise ValueError(f"{root}: empty folder, not a cache ({make})")
        raise ValueError(f"{root}: no index.json, so not a finished cache (rerun `python data.py prepare` to finish it)")
    index = json.loads(path.read_text())
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {index.get('format')}, this data.py reads {CACHE_FORMAT}; prepare again")
    return index


def _splits_of(records) -> list:
    found = {r["split"] for r in records}
    return sorted(found, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))


ALL_SPLITS = "all"  # CacheDataset(root, ALL_SPLITS): every record (Table 1 tests on all of RAD-ChestCT, paper 2.4.1)


class CacheDataset(torch.utils.data.Dataset):
    """One split of a cache written by `prepare` (or all of it: ALL_SPLITS); items are Records read through a
    memory map."""

    def __init__(self, root, split: str):
        self.root = Path(root)
        index = _read_index(self.root)
        splits = _splits_of(index["records"])
        if split not in splits and split != ALL_SPLITS:
            raise ValueError(f"{root}: no split {split!r}; it has {splits}")
        self.records = [r for r in index["records"] if split in (r["split"], ALL_SPLITS)]
        self.name, self.modality, self.split = index["name"], index["modality"], split
        self.ids = [r["id"] for r in self.records]
        self.labels = np.array([[math.nan if v is None else v for v in r["labels"]] for r in self.records],
                               np.float32).reshape(-1, len(LABELS))
        self.fingerprint = _digest([index["settings"], self.name, split, self.records])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        r = self.records[i]
        path = self.root / "arrays" / f"{r['key']}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: unreadable cache array ({e})") from e
        if list(arr.shape) != r["shape"]:
            raise ValueError(f"{path}: shape {arr.shape}, index.json says {r['shape']}")
        image = validate_image(_float32(arr), str(path), 1, is_3d=self.modality == "3d")
        return Record(image, self.labels[i].copy(), self.modality, r["id"])


class PhantomDataset(torch.utils.data.Dataset):
    """A phantom split generated on the fly, deterministic by (seed, split, index), memoized.

    n: samples in the split (default PHANTOM_N); size: long side (default 224
    for 2D, 112 for 3D); memo_bytes: how much of the split each process keeps.
    """

    def __init__(self, name: str, split: str, n: int = None, size: int = None, seed: int = 0,
                 memo_bytes: int = 1 << 30):
        if name not in PHANTOMS:
            raise ValueError(f"unknown phantom {name!r}; one of {PHANTOMS}")
        if split not in ("train", "test"):
            raise ValueError(f"{name}: no split {split!r}; it has ['train', 'test']")
        self.name, self.split, self.seed = name, split, seed
        self.modality = "3d" if "3d" in name else "2d"
        self.n = PHANTOM_N[split] if n is None else int(n)
        self.size = size or (CT_SIZE if self.modality == "3d" else XRAY_SIZE)
        self.ids = [f"{name}-{split}-{i:06d}" for i in range(self.n)]
        self.fingerprint = _digest([PHANTOM_VERSION, name, split, self.n, self.size, seed])
        self._labels, self._memo, self._memo_left = None, {}, memo_bytes

    @property
    def labels(self) -> np.ndarray:  # (n, 5), from the patients' parameters: no rendering
        if self._labels is None:
            self._labels = np.stack([sample_patient(phantom_rng(self.name, self.split, i, self.seed))["labels"]
                                     for i in range(self.n)]).reshape(-1, len(LABELS))
        return self._labels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name}/{self.split}: index {i} out of range({self.n})")
        if i in self._memo:
            image, labels = self._memo[i]
            return Record(_float32(image), labels, self.modality, self.ids[i])
        rec = phantom_record(self.name, self.split, i, self.size, self.seed)
        if rec.image.size * 2 <= self._memo_left:
            self._memo[i] = (rec.image.astype(np.float16), rec.labels)
            self._memo_left -= rec.image.size * 2
        return rec


def open_dataset(spec: str, split: str, **phantom_options) -> torch.utils.data.Dataset:
    """A phantom name (options n, size, seed) or a cache directory from `python data.py prepare`."""
    if spec in PHANTOMS:
        return PhantomDataset(spec, split, **phantom_options)
    if phantom_options:
        raise ValueError(f"{spec}: options {sorted(phantom_options)} apply to phantom datasets only")
    return CacheDataset(spec, split)


def list_splits(spec: str) -> list:
    return ["train", "test"] if spec in PHANTOMS else _splits_of(_read_index(Path(spec))["records"])


def describe(spec: str, **phantom_options) -> dict:
    """{"name", "modality", "splits": {split: count}, "prevalence": {split: [5 floats, NaN-aware]}}."""
    sets = [open_dataset(spec, s, **phantom_options) for s in list_splits(spec)]
    return {"name": sets[0].name, "modality": sets[0].modality,
            "splits": {d.split: len(d) for d in sets},
            "prevalence": {d.split: _prevalence(d.labels) if len(d) else [] for d in sets}}


def _prevalence(labels: np.ndarray) -> list:
    """Fraction positive among the known labels, per label; NaN for a label never known (NIH's Lung Opacity)."""
    known = (~np.isnan(labels)).sum(0)
    return [float(np.nansum(col) / k) if k else math.nan for col, k in zip(labels.T, known)]


# ---------------------------------------------------------------- views (paper 2.4.1)

def _patched(shape) -> np.ndarray:
    """Which axes of (Z, H, W) are cut into patches: all three for a volume, H and W for a 2D image."""
    return np.array([shape[0] > 1, True, True])


def make_views(image: np.ndarray, rng: np.random.Generator, patch: int, n_global: int = 2, n_local: int = 8,
               global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), ratio=(3 / 4, 4 / 3)) -> list:
    """paper 2.4.1: n_global global then n_local local random crops, 2D and 3D alike.

    A crop covers a fraction `scale` of the image's area (2D) or volume (3D),
    its sides jittered around the image's own proportions (each pair of sides
    within `ratio`), kept at native resolution (no resizing) and snapped to
    whole patches, at least one per axis. Returns tensors (1, z, h, w).
    """
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
        views.append(crop.clone(memory_format=torch.contiguous_format)[None])
    return views


# Paper 2.4.1 names only the multi-crop, the default. Optional (train.py --photometric): the official
# LeJEPA example's photometric views (ColorJitter(0.8, 0.8) with p 0.8, GaussianBlur 7 taps, sigma
# 0.1-2 px, p 0.5, solarize p 0.2), without hue and saturation (grey images) and without its
# horizontal flip (left and right are anatomy in a chest). On the phantoms it cost 2D AUROC and
# embedding rank at 1000 steps (README "What collapsed, and why"), so it is off unless asked for.
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
                 global_scale, local_scale, patch, seed, rank, world, photometric=False):
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
                                   self.global_scale, self.local_scale)
                if self.photometric:  # drawn after the crops: the crops are the same with or without
                    views = [photometric(v, rng) for v in views]
                return rec, views, skipped
            except Exception as e:  # never crash mid-run on one bad file
                message = f"skipping {ds.name}/{ds.split}[{i}]: {e}"
                if message not in _WARNED:  # once per file and process
                    _WARNED.add(message)
                    warnings.warn(message)
        raise RuntimeError(f"{ds.name}/{ds.split}: no record could be loaded (all {len(ds)} failed)")

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
                workers=0, pin_memory=False, photometric=False) -> torch.utils.data.DataLoader:
    """Batches of steps start_step .. steps-1 (paper 2.3/2.4: 192 2D + 64 3D; stage 1: 256 2D).

    Views are cropped and packed inside the worker processes; resume = start
    at start_step. alpha (RoPE scale) is applied by the model: pack.py stores
    grid indices, so it does not change the batches.
    """
    ds = StepDataset(ds_2d, ds_3d, batch_2d=batch_2d, batch_3d=batch_3d, steps=steps, mode=mode,
                     n_global=n_global, n_local=n_local, global_scale=global_scale, local_scale=local_scale,
                     patch=patch, seed=seed, rank=rank, world=world, photometric=photometric)
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start_step, steps), num_workers=workers,
                                       collate_fn=_as_is, pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the training process: a scheduler signals the whole process group,
    and a worker killed by it would take the run down before train.py writes its checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------- command line

def _peek(src: Source) -> None:
    """Cheap readability check: headers only."""
    if src.kind == "xray":
        from PIL import Image
        with Image.open(src.path) as im:
            im.size
    elif src.kind == "nifti":
        import nibabel as nib
        img = nib.load(src.path)
        if len(img.shape) != 3:
            raise ValueError(f"{src.path}: expected a 3D volume, got shape {img.shape}")
        if src.path.endswith(".gz"):
            offset = img.dataobj.offset  # where the voxels start in the uncompressed file (vox_offset)
            _check_gzip_size(src.path, offset + math.prod(img.shape) * img.header.get_data_dtype().itemsize)
    elif src.kind == "npz":
        read_radchest(src.path, header_only=True)


def _check_gzip_size(path: str, expected: int) -> None:
    """A gzip member ends with its uncompressed size mod 2^32 (RFC 1952 ISIZE): one seek tells a truncated
    .nii.gz (whose last bytes are then compressed data) from a whole one, without decompressing it."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize != expected % 2 ** 32:
        raise ValueError(f"{path}: truncated or corrupt: its gzip trailer says {isize} bytes uncompressed, "
                         f"its NIfTI header implies {expected % 2 ** 32} (mod 2^32)")


def check(name: str, root, opt: Options, full: bool = False) -> dict:
    """What a dataset holds before a long run: counts, label prevalence and every problem with its path."""
    sources = scan(name, root, opt)
    problems = []
    for src in tqdm(sources, desc=f"check {name}", unit="file", disable=None if len(sources) >= 100 else True):
        try:
            if src.problem:
                raise ValueError(src.problem)
            if src.kind not in ("phantom", "dicom-ct") and not Path(src.path).is_file():
                raise FileNotFoundError("file not found")
            load_source(src, opt) if full else _peek(src)
        except Exception as e:
            problems.append((src.path, f"{type(e).__name__}: {e}"))
    splits = {s: [x for x in sources if x.split == s] for s in _splits_of([{"split": x.split} for x in sources])}
    labels = {s: {label: [int((y == 1).sum()), int((y == 0).sum()), int(np.isnan(y).sum())]
                  for label, y in zip(LABELS, np.stack([x.labels for x in xs]).T)} for s, xs in splits.items()}
    unit = "series or files" if name == "dicom" else "files"
    bad = {p for p, _ in problems}
    usable = {s: sum(x.path not in bad for x in xs) for s, xs in splits.items()}
    print(f"{name} at {root}: {len(sources)} {unit}, {len(problems)} with problems")
    for s, xs in splits.items():
        paper = PAPER_N.get((name, s))
        print(f"  {s or '(no split)'}: {len(xs)}, {usable[s]} usable" + (f"  (paper 2.4.1: n={paper:,})" if paper else ""))
        for label, (pos, neg, unk) in labels[s].items():
            print(f"    {label:17s} positive {pos:7d}  negative {neg:7d}  unknown {unk:7d}")
    if (name, "all") in PAPER_N:  # RAD-ChestCT: Table 1 tests on every split
        print(f"  all splits: {len(sources)}, {sum(usable.values())} usable  (paper 2.4.1: n={PAPER_N[name, 'all']:,})")
    for path, error in problems:
        print(f"  problem: {path}: {error}")
    return {"splits": {s: len(xs) for s, xs in splits.items()}, "usable": usable, "labels": labels,
            "problems": problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Prepare (convert once into a cache) or check a dataset.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{prepare,check}")
    helps = {"prepare": "convert a raw dataset once into a cache of preprocessed arrays that training and probing "
                        "read (parallel, resumable; failures listed in OUT/report.tsv)",
             "check": "what a raw dataset holds, before a long run: counts, label prevalence per split, and every "
                      "unreadable file with its path"}
    for command in ("prepare", "check"):
        p = sub.add_parser(command, help=helps[command], description=helps[command][0].upper() + helps[command][1:] + ".")
        p.add_argument("--dataset", required=True, choices=[*MODALITY, "phantom"], help="which reader (phantom: the built-in phantom chests)")
        p.add_argument("--root", default="", help="raw dataset folder (not needed for phantom)")
        p.add_argument("--size", type=int, default=0, help="long side; default 224 (2D) / 112 (3D), paper 2.4")
        p.add_argument("--min-side", type=int, default=14, help="reject images with a side shorter than this (one patch; default: %(default)s)")
        p.add_argument("--uncertain", choices=["nan", "zero", "one"], default="nan", help="MIMIC/CheXpert label -1.0 (default: %(default)s)")
        p.add_argument("--blank", choices=["nan", "zero"], default="nan", help="MIMIC/CheXpert blank label (default: %(default)s)")
        p.add_argument("--mimic-views", default="PA,AP", help="MIMIC frontal views in order of preference (default: %(default)s)")
        p.add_argument("--mimic-split", choices=["paper", "official"], default="paper",
                       help="MIMIC split: the paper's patient-wise 80/20 (2.4.1, seeded by --seed) or the official "
                            "split.csv.gz (test ~2%%; default: %(default)s)")
        p.add_argument("--frontal-only", action="store_true", help="CheXpert: drop lateral views")
        p.add_argument("--chexpert-table", default="", help="CheXpert label CSV (default: groundtruth.csv, ...)")
        p.add_argument("--ctrate-version", choices=["auto", "1", "2"], default="auto",
                       help="CT-RATE: 1 (train/, valid/: raw values, metadata rescale), 2 (train_fixed/, valid_fixed/: HU) "
                            "or auto from the folder names (default: %(default)s)")
        p.add_argument("--one-per-scan", action="store_true", help="CT-RATE: first reconstruction of each scan only")
        p.add_argument("--v1-flip", default="", help="CT-RATE v1: axes of (Z, Y, X) to flip after reading the "
                       "stored axes as Left, Posterior, Superior (see CTRATE_V1_AXES), e.g. 'z' (default: none)")
        p.add_argument("--phantom", choices=PHANTOMS, default="phantom2d", help="phantom: which one (default: %(default)s)")
        p.add_argument("--n", type=int, default=1024, help="phantom: train samples (test: n // 4; default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="phantom: seed; patient splits made here (MIMIC paper, "
                       "NIH without lists): their seed (default: %(default)s)")
        p.add_argument("--dicom-modality", choices=["3d", "2d"], default="3d",
                       help="DICOM: 3d reads CT series as volumes, 2d reads CR/DX/DR radiographs (default: %(default)s)")
        if command == "prepare":
            p.add_argument("--out", required=True, help="cache folder")
            p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes (default: %(default)s, the CPUs)")
        else:
            p.add_argument("--full", action="store_true", help="decode every file, not only headers")
    args = ap.parse_args(argv)
    opt = Options(size=args.size, min_side=args.min_side, uncertain=args.uncertain, blank=args.blank,
                  mimic_views=args.mimic_views, mimic_split=args.mimic_split, frontal_only=args.frontal_only,
                  chexpert_table=args.chexpert_table,
                  ctrate_version=args.ctrate_version, one_per_scan=args.one_per_scan, v1_flip=args.v1_flip,
                  phantom=args.phantom, n=args.n, seed=args.seed, dicom_modality=args.dicom_modality)
    try:  # a user's mistake (missing root, table or column, no pydicom) is one line, not a traceback
        if args.command == "prepare":
            prepare(args.dataset, args.root, args.out, opt, args.workers)
            return 0
        return 0 if len(check(args.dataset, args.root, opt, args.full)["problems"]) == 0 else 1
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"data.py {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
