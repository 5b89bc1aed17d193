"""On-disk formats of the chest datasets (paper 2.4.1): what `python data.py prepare` and `check` read.

The paper's four datasets (MIMIC-CXR-JPG, CheXpert test, CT-RATE v1 and v2, RAD-ChestCT), NIH ChestX-ray14,
DICOM (CT series with their geometry, CR/DX radiographs) and plain folders of images or NIfTI volumes. A
scan_* function turns a dataset's tree and label tables into Sources: one raw file (or DICOM series) each,
with its labels, split and id, and the problem that will skip it if one is known before decoding. peek reads
a Source's headers; read_ct, read_dicom_xray and (for PNG/JPG) Pillow decode it into raw values: HU with the
voxel spacing for CT, pixels for a radiograph. The paper's preprocessing of those (window, long side) and the
cache are data.py's, which imports this module; this one imports numpy and the standard library, nibabel and
Pillow where a function reads such a file, and pydicom (optional) only when DICOM is read.

Labels: float32 (5,) in the paper's order (CHEXPERT_COLUMNS, data.LABELS), NaN where unknown; each dataset's
own columns are mapped onto it (CTRATE_COLUMNS, RADCHEST_PREFIXES, NIH_COLUMNS). Ids are stable, patient
first, '/'-separated ("p10000032/s50414267"): splits and the bootstrap group by the part before the first '/'.

Orientation: every 3D array is (Z, Y, X) with Z superior -> inferior,
Y anterior -> posterior, X patient right -> patient left: RAD-ChestCT's own
order. An axial slice then looks as radiologists display it, and projecting a
volume along Y gives a radiograph in the usual display (head up, patient right
on the viewer's left), which is how the phantom makes its 2D images. NIfTI
files with a trustworthy affine and DICOM series (their affine built from
ImagePositionPatient / ImageOrientationPatient) are reoriented by one function,
canonical_zyx; CT-RATE v1, whose headers are not trusted, by CTRATE_V1_AXES.
"""
import csv
import gzip
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# MIMIC-CXR-JPG and CheXpert label tables: the CheXpert labeler's columns, the paper's five labels (2.4) in their order
CHEXPERT_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Lung Opacity", "Pleural Effusion")
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
NIH_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", None, "Effusion")  # the paper's order; no Lung Opacity
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


def add_arguments(p) -> None:
    """The command-line flags of the reading options above (`python data.py prepare` and `check`)."""
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
                   "stored axes as running towards the patient's Left, Posterior and Superior (v1 headers are not "
                   "trusted; v2's corrected affines say so of the same arrays), e.g. 'z' if a volume comes out upside "
                   "down (default: none)")
    p.add_argument("--dicom-modality", choices=["3d", "2d"], default="3d",
                   help="DICOM: 3d reads CT series as volumes, 2d reads CR/DX/DR radiographs (default: %(default)s)")


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


def file_key(text: str) -> str:
    """A Source key: the text with every character a file name may not hold replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _nan_labels() -> np.ndarray:
    return np.full(len(CHEXPERT_COLUMNS), np.nan, np.float32)



# ---------------------------------------------------------------- the paper's datasets, NIH, folders

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
    table = read_table(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_COLUMNS])
    split_table = root / "mimic-cxr-2.0.0-split.csv.gz"
    split_of = ({r["dicom_id"]: r["split"] for r in read_table(split_table, ["dicom_id", "split"])}
                if opt.mimic_split == "official" else {})
    labels_of = {}
    for n, r in enumerate(table):
        where = f"{root / 'mimic-cxr-2.0.0-chexpert.csv.gz'} row {n + 2}"
        labels_of[_int(r["subject_id"], where), _int(r["study_id"], where)] = _row_labels(r, CHEXPERT_COLUMNS, opt, where)
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
        sources.append(Source(file_key(dicom), f"p{subject}/s{study}", split, labels_of.get((subject, study), _nan_labels()),
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
        sources.append(Source(file_key(Path(name).stem), f"{patient}/{name}", split, labels, str(path), "xray",
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
    rows = read_table(table, CHEXPERT_COLUMNS)
    column = "Study" if rows and "Study" in rows[0] else "Path"
    if rows and column not in rows[0]:
        raise ValueError(f"{table}: missing column 'Study' or 'Path'; found {list(rows[0])}")
    sources = []
    for n, r in enumerate(rows):
        labels = _row_labels(r, CHEXPERT_COLUMNS, opt, f"{table} row {n + 2}")
        where = _resolve(root, r[column])
        paths = sorted(where.glob("*.jpg")) if column == "Study" else [where]
        if column == "Study" and not paths:
            sources.append(Source(file_key(r[column]), r[column], "test", labels, str(where), "xray",
                                  problem="study folder has no .jpg image"))
        for path in paths:
            if opt.frontal_only and "lateral" in path.name.lower():
                continue
            rid = "/".join([*path.parent.parts[-2:], path.stem])
            # from the table's own path, not the absolute one: a root like /data/train/chexpert is no train split
            split = next((p for p in ("train", "valid") if p in Path(r[column]).parts), "test")
            sources.append(Source(file_key(rid), rid, split, labels, str(path), "xray"))
    return sources


def _floats(text: str) -> list:
    return [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(text))]


def scan_ctrate(root: Path, opt: Options) -> list:
    """CT-RATE v1 (HU from metadata slope/intercept, header ignored) or v2 (*_fixed, HU in the file)."""
    ds = ctrate_dir(root)
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
            src = Source(file_key(stem), f"{'_'.join(parts[:2])}/{stem}", split, labels_of.get(name, _nan_labels()),
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


def ctrate_dir(root: Path) -> Path:
    """The folder that holds CT-RATE's volume folders: root/dataset/ as downloaded, or root itself."""
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
        for label, want in zip(CHEXPERT_COLUMNS, RADCHEST_PREFIXES):
            cols = [c for c in columns if c.split("*")[0] == want]  # exact prefix, never a substring
            if not cols:
                raise ValueError(f"{table}: no column '{want}*<location>' for {label}")
            groups.append(cols)
        for n, r in enumerate(rows):
            labels_of[r["NoteAcc_DEID"]] = np.array([max(_radchest_cell(r[c], f"{table} row {n + 2}, column {c!r}")
                                                         for c in cols) for cols in groups], np.float32)
    return [Source(file_key(p.stem), p.stem, RADCHEST_SPLITS[p.stem[:3]][0], labels_of.get(p.stem, _nan_labels()),
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
        sources.append(Source(file_key(rid), rid, "train", _nan_labels(), str(p), "xray" if modality == "2d" else "nifti"))
    return sources



# ---------------------------------------------------------------- DICOM

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
        patient = file_key(str(first.get("PatientID", "") or "unknown"))
        modality = str(first.get("Modality", "")).upper()
        folder = files[0][0].parent
        where = str(folder) if per_folder[folder] == 1 else f"{folder} [series {uid}]"
        if modality in DICOM_XRAY:
            for path, ds in files:
                sop = str(ds.get("SOPInstanceUID", path.name))
                problem = (f"{modality} radiograph: this run reads CT volumes (--dicom-modality 2d reads it)"
                           if opt.dicom_modality == "3d" else _truncation_problem(path, ds) or _decoder_problem(ds))  # 2d, any
                sources.append(Source(file_key(sop), f"{patient}/{sop}", "train", _nan_labels(), str(path), "dicom-xray",
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
        sources.append(Source(file_key(uid), f"{patient}/{uid}", "train", _nan_labels(), where, "dicom-ct",
                              problem=problem, files=tuple(str(p) for p, _ in files)))
    return sources


def scan(name: str, root, opt: Options) -> list:
    """All Sources of a raw dataset (data.py adds the phantom); errors name the missing root, table or column."""
    if name not in MODALITY:
        raise ValueError(f"unknown dataset {name!r}; one of {sorted(MODALITY)}")
    root = Path(root or "")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found")
    if name.startswith("folder"):
        return scan_folder(root, MODALITY[name])
    return {"mimic": scan_mimic, "chexpert": scan_chexpert, "ctrate": scan_ctrate, "radchest": scan_radchest,
            "nih": scan_nih, "dicom": scan_dicom}[name](root, opt)


# ---------------------------------------------------------------- NIfTI, orientation, CT volumes, headers

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


def read_ct(src: Source, opt: Options) -> tuple:
    """A CT Source (nifti, npz, dicom-ct) -> ((Z, Y, X) HU float32 in the project orientation, spacing (z, y, x) mm).

    The spacing is the dataset's metadata where it gives one (CT-RATE v1, RAD-ChestCT), else the file's own.
    """
    if src.kind == "nifti":
        hu, spacing = read_nifti(src.path, src.rescale, opt.v1_flip if src.rescale else "")
        return hu, src.spacing or spacing
    if src.kind == "npz":
        return read_radchest(src.path).astype(np.float32), RADCHEST_SPACING
    if src.kind == "dicom-ct":
        return read_dicom_series(src.files)
    raise ValueError(f"{src.path}: a {src.kind} source is no CT volume")


def peek(src: Source) -> None:
    """Cheap readability check of a Source, for `check`: headers only (data.load_source decodes)."""
    if src.kind == "xray":
        from PIL import Image
        with Image.open(src.path) as im:
            fmt = im.format
        _check_image_end(src.path, fmt)
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


IMAGE_END = {"PNG": b"IEND", "JPEG": b"\xff\xd9"}  # the marker a whole file ends with (PNG's IEND chunk, JPEG's EOI)


def _check_image_end(path: str, fmt: str) -> None:
    """A PNG or JPEG cut short (a copy that stopped) has a readable header but no end marker: read the last bytes."""
    marker = IMAGE_END.get(fmt)
    if marker is None:
        return
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 32))
        tail = f.read()
    if marker not in tail:
        raise ValueError(f"{path}: truncated {fmt} file (no end marker): the copy stopped short")


def _check_gzip_size(path: str, expected: int) -> None:
    """A gzip member ends with its uncompressed size mod 2^32 (RFC 1952 ISIZE): one seek tells a truncated
    .nii.gz (whose last bytes are then compressed data) from a whole one, without decompressing it."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize != expected % 2 ** 32:
        raise ValueError(f"{path}: truncated or corrupt: its gzip trailer says {isize} bytes uncompressed, "
                         f"its NIfTI header implies {expected % 2 ** 32} (mod 2^32)")
