"""The paper's experiments, whole (paper 2.3 and 3): S1, S2, S3, Supervised and the random initialisation,
through Tables 1-3 and Figure 2, at several seeds, from one command; the claims judged by the numbers.

    python reproduce.py --dry-run          # the plan and its time estimate, nothing run
    python reproduce.py                    # phantom chests, CPU budget: 2 seeds -> results/
    python reproduce.py --seeds 0 1 2 --steps 1000
    python reproduce.py --data cache/mimic cache/ctrate --model base --steps 20000 --probe-data cache/mimic \\
        cache/chexpert cache/ctrate cache/radchest         # real data on a GPU (one process per run)

Per seed s, under RUNS/seed<s>/ (the same seed for the initialisation, the data order, the phantoms, the
held-out split and the bootstrap, so each seed is a whole replicate):
    s1/          train.py --stage 1                         2D only (paper 2.3)
    s2/          train.py --stage 2 --init s1/last.pt       mixed stream from stage 1, as many steps again
    s3/          train.py --stage 3                         mixed stream from scratch
    supervised/  train.py --stage 3 --objective supervised  same backbone, data and steps (Table 1)
    probe/       probe.py --ckpt S1 S2 S3 Supervised --random-init: Tables 1-3, Figure 2, curves
    health.json  each row's embedding health on held-out samples
Resumable: a finished run (its last.pt at the planned step) and a finished probe are not redone, a killed run
continues from its checkpoint (train.py --resume auto), probe features are cached. results/ is rewritten from
whatever has finished: summary.md (the tables over seeds, the health, the claims), summary.json, and each
seed's probe outputs in results/seed<s>/.

Imports features, figures, lejepa, model, data and bench (for the GEMM rate); nothing imports it.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

import data
import figures
import lejepa
import features
from model import Projector, load_checkpoint

ROWS = ("S1", "S2", "S3", "Supervised")  # trained rows; "Random init" comes from probe.py --random-init
RANDOM = "Random init"
TEST_SETS = {"mimic": "MIMIC", "chexpert": "CheXpert", "ctrate": "CT-RATE", "radchest": "RAD-ChestCT"}
INTERNAL = ("mimic", "ctrate")  # the internal test sets (paper Table 1)
# CPU demo step (tiny, depth 6, 24 + 8 samples, 2 + 8 views) measured at 1.2 s on a 2-core EPYC at 132 GFLOP/s
REF_STEP_S, REF_GFLOPS = 1.2, 132.0
REF_PROBE_S_PER_SAMPLE = 0.004  # probe.py on that machine: rendering + embedding, per sample and row
HEALTH_N = 256  # held-out samples per modality for the health figures
GOAL_N_2D = 24  # the goal is stated on 24 held-out radiographs


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, run in order (default: 0 1)")
    p.add_argument("--steps", type=int, default=500,
                   help="optimizer steps of every trained row; S2 takes as many again from S1 (default: %(default)s)")
    p.add_argument("--model", default=None, help="train.py --model (default: train.py's: tiny CPU demo on phantoms)")
    p.add_argument("--data", nargs="+", default=["phantom"], help="train.py --data (default: phantom)")
    p.add_argument("--probe-data", nargs="+", default=None, help="probe.py --data (default: --data)")
    p.add_argument("--n-test", type=int, default=1024, help="phantom test samples per set (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=None, help="phantom LP training samples per set (default: probe.py's)")
    p.add_argument("--train-args", default="", help="more train.py flags for every run, one quoted string")
    p.add_argument("--runs", default="runs/reproduce", help="folder of the runs (default: %(default)s)")
    p.add_argument("--out", default=None, help="where the tables over seeds go (default: results/grid-<steps>steps)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--summarize", action="store_true", help="only rewrite --out from what has finished")
    p.add_argument("--readme", action="store_true", help=f"only rewrite README.md's results block from "
                   f"{README_GRID}/summary.json")
    args = p.parse_args(argv)
    args.out = args.out or f"results/grid-{args.steps}steps"
    return args


# ---------------------------------------------------------------- the plan

def plan(args) -> list:
    """[(seed, name, kind, argv, folder)] in the order they run; kind 'train' or 'probe'."""
    steps, jobs = str(args.steps), []
    common = ["--steps", steps, *(["--model", args.model] if args.model else []), "--data", *args.data,
              *shlex.split(args.train_args)]
    for seed in args.seeds:
        root = os.path.join(args.runs, f"seed{seed}")
        run = {name: os.path.join(root, folder) for name, folder in
               (("S1", "s1"), ("S2", "s2"), ("S3", "s3"), ("Supervised", "supervised"))}
        extra = {"S1": ["--stage", "1"], "S2": ["--stage", "2", "--init", os.path.join(run["S1"], "last.pt")],
                 "S3": ["--stage", "3"], "Supervised": ["--stage", "3", "--objective", "supervised"]}
        for name in ROWS:
            argv = ["train.py", *extra[name], *common, "--seed", str(seed), "--out", run[name], "--resume", "auto"]
            jobs.append((seed, name, "train", argv, run[name]))
        ckpts = [f"{name}={os.path.join(run[name], 'last.pt')}" for name in ROWS]
        argv = ["probe.py", "--ckpt", *ckpts, "--random-init", "--seed", str(seed), "--n-test", str(args.n_test),
                "--data", *(args.probe_data or args.data), "--out", os.path.join(root, "probe")]
        if args.n_train:
            argv += ["--n-train", str(args.n_train)]
        jobs.append((seed, "probe", "probe", argv, os.path.join(root, "probe")))
    return jobs


def trained_step(folder: str) -> int:
    """The step of folder/last.pt, 0 when there is none (or it cannot be read)."""
    path = os.path.join(folder, "last.pt")
    if not os.path.exists(path):
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # a damaged checkpoint: train.py --resume auto says what is wrong with it
        return 0


def is_done(job, args) -> bool:
    seed, name, kind, argv, folder = job
    if kind == "train":
        return trained_step(folder) >= args.steps
    table = os.path.join(folder, "table1.json")
    inputs = [os.path.join(os.path.dirname(folder), f, "last.pt") for f in ("s1", "s2", "s3", "supervised")]
    return os.path.exists(table) and all(os.path.exists(p) and os.path.getmtime(p) < os.path.getmtime(table)
                                         for p in inputs)


def step_seconds(args) -> tuple:
    """(seconds per training step, where the figure comes from): a finished run's own log if there is one,
    else the CPU demo's reference scaled by this machine's GEMM rate (phantom CPU demo only)."""
    for seed in args.seeds:
        for folder in ("s3", "s1", "supervised", "s2"):
            path = os.path.join(args.runs, f"seed{seed}", folder, "metrics.jsonl")
            times = [r["step_time_s"] for r in figures.read_metrics(path) if "step_time_s" in r] \
                if os.path.exists(path) else []
            if times:
                return float(np.median(times)), f"measured in {path}"
    if torch.cuda.is_available() or args.data != ["phantom"] or args.model:
        return None, "no estimate for this configuration before a run has logged its time per step"
    import bench  # the GEMM rate only; bench imports the model
    rate = bench.gemm_rate(torch.device("cpu"), seconds=0.3)
    return REF_STEP_S * REF_GFLOPS / rate, f"the CPU demo's {REF_STEP_S} s/step at {REF_GFLOPS:.0f} GFLOP/s, " \
                                           f"scaled to this machine's {rate:.0f} GFLOP/s"


def print_plan(jobs: list, args) -> float:
    per_step, source = step_seconds(args)
    n_probe = 4 * args.n_test + 5 * (args.n_train or data.PHANTOM_N["train"])  # 4 test sets, 5 LP/Table 2 train sets
    total = 0.0
    print(f"reproduce.py: {len(args.seeds)} seed(s) x (S1, S2, S3, Supervised: {args.steps} steps each; probe with "
          f"Random init) -> {args.runs}, summary in {args.out}/")
    for job in jobs:
        seed, name, kind, argv, folder = job
        done = is_done(job, args)
        if kind == "train":
            left = args.steps - trained_step(folder)
            est = None if per_step is None else left * per_step
        else:
            est = None if per_step is None else n_probe * 5 * REF_PROBE_S_PER_SAMPLE * per_step / REF_STEP_S
        total += 0 if done or est is None else est
        when = "done" if done else ("?" if est is None else f"~{est / 60:.0f} min")
        print(f"  seed {seed} {name:<10} {when:>9}  python {' '.join(argv)}")
    print(f"estimate: {total / 3600:.1f} h left ({source})" if per_step else f"estimate: {source}")
    return total


def run_job(argv: list, log) -> tuple:
    """Run one job -> (exit code, the signal that stopped it or None). Ctrl-C and SIGTERM are passed on to the
    job, once each, and waited for, so train.py checkpoints before it exits (signals.py); subprocess.call would
    kill it at once, losing every step since its last checkpoint. The job has its own session, so a terminal's
    Ctrl-C reaches it once, through here, and not a second time from the process group."""
    child = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    got = []

    def forward(sig, frame):
        got.append(sig)
        child.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = child.wait()  # a handled signal does not interrupt the wait (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc, (got[0] if got else None)


def run_jobs(jobs: list, args):
    for job in jobs:
        seed, name, kind, argv, folder = job
        if is_done(job, args):
            continue
        print(f"\n=== seed {seed}: {name}: python {' '.join(argv)}", flush=True)
        os.makedirs(folder, exist_ok=True)
        start = time.time()
        with open(os.path.join(folder, f"{kind}.log"), "a") as log:
            rc, sig = run_job(argv, log)
        if sig is not None:
            print(f"reproduce.py: {signal.Signals(sig).name}: seed {seed} {name} stopped (exit {rc}); see "
                  f"{folder}/{kind}.log. Run the same command again to continue from its checkpoint.", file=sys.stderr)
            raise SystemExit(128 + sig)
        if rc != 0 or not is_done(job, args):
            raise SystemExit(f"reproduce.py: seed {seed} {name} stopped (exit {rc}); see {folder}/{kind}.log. "
                             f"Run the same command again to continue from where it stopped.")
        print(f"    finished in {(time.time() - start) / 60:.1f} min", flush=True)
        summarize(args)  # results/ follows the grid as it goes


# ---------------------------------------------------------------- embedding health (issue: beside every row)

def top_share(z: np.ndarray) -> float:
    """The fraction of the variance along the first principal direction."""
    s = np.linalg.svd(z - z.mean(0), compute_uv=False) ** 2
    return float(s[0] / max(s.sum(), 1e-30))


def rank(z: np.ndarray) -> float:
    return float(lejepa.effective_rank(torch.from_numpy(np.ascontiguousarray(z))))


def gaussian_sigreg(n: int, k: int, draws: int = 8) -> float:
    """SIGReg of an isotropic Gaussian batch of n samples in k dimensions: what a perfect embedding scores."""
    g = torch.Generator().manual_seed(0)
    return float(np.mean([lejepa.sigreg(torch.randn(n, k, generator=g), step).item() for step in range(draws)]))


def gaussian_rank(n: int, k: int, draws: int = 8) -> float:
    """Effective rank of n isotropic Gaussian samples in k dimensions: the most n samples can show."""
    g = torch.Generator().manual_seed(0)
    return float(np.mean([lejepa.effective_rank(torch.randn(n, k, generator=g)).item() for _ in range(draws)]))


def grid_rows(folder: str, steps: int) -> dict:
    """{row name: last.pt} of a seed's runs that reached their steps."""
    return {r: os.path.join(folder, d, "last.pt") for r, d in
            (("S1", "s1"), ("S2", "s2"), ("S3", "s3"), ("Supervised", "supervised"))
            if trained_step(os.path.join(folder, d)) >= steps}


def health(rows: dict, seed: int, n: int = HEALTH_N) -> dict:
    """Each row's embedding health on held-out phantom test samples of `seed` (whole views, as the probe sees
    them): effective rank of the backbone (and the LeJEPA projector) within each modality, the top direction's
    share of the variance, and the run's last logged SIGReg beside an isotropic Gaussian batch of the same size.
    rows: {name: checkpoint path}; the random initialisation is added."""
    ckpts = features.load_checkpoints([f"{r}={p}" for r, p in rows.items()], "auto")
    if not ckpts:
        return {}
    ckpts.append(features.random_init(ckpts[0], "auto", seed))
    a = ckpts[0].train_args
    sets = {m: data.open_dataset(f"phantom{m}", "test", n=n, size=a.get(f"size_{m}"), seed=seed) for m in ("2d", "3d")}
    feats = {m: features.extract_features_of([c.model for c in ckpts], ds, 32768) for m, ds in sets.items()}
    out = {}
    for i, c in enumerate(ckpts):
        x = {m: feats[m][i]["x"] for m in sets}
        row = {"rank_2d": rank(x["2d"]), "rank_3d": rank(x["3d"]), f"rank_2d_{GOAL_N_2D}": rank(x["2d"][:GOAL_N_2D]),
               "top_2d": top_share(x["2d"]), "top_3d": top_share(x["3d"]),
               "top_mixed": top_share(np.concatenate([x["2d"], x["3d"]]))}
        if c.path and c.train_args.get("objective") == "lejepa":
            ckpt = load_checkpoint(c.path)
            t = c.train_args
            head = Projector(c.model.dim, t.get("proj_hidden", 2048), t.get("proj_out", 128), t.get("proj_norm", "layer"))
            head.load_state_dict(ckpt["head"])
            head.eval()  # BatchNorm: the running statistics, not those of the test set
            with torch.no_grad():
                z = {m: head(torch.from_numpy(x[m])).numpy() for m in x}
            row |= {"proj_rank_2d": rank(z["2d"]), "proj_rank_3d": rank(z["3d"]),
                    f"proj_rank_2d_{GOAL_N_2D}": rank(z["2d"][:GOAL_N_2D]),
                    f"proj_rank_gaussian_{GOAL_N_2D}": gaussian_rank(GOAL_N_2D, z["2d"].shape[1])}
            logged = [r for r in figures.read_metrics(os.path.join(os.path.dirname(c.path), "metrics.jsonl"))
                      if "sigreg" in r and r.get("step", 0) <= ckpt["step"]]  # a kept mid-run checkpoint: its own
            if logged:
                batch = c.train_args["batch_2d"] + c.train_args["batch_3d"]
                row |= {"sigreg_end": logged[-1]["sigreg"], "sigreg_gaussian": gaussian_sigreg(batch, z["2d"].shape[1]),
                        "sigreg_batch": batch}
        out[c.name] = row
    return out


# ---------------------------------------------------------------- reading the probe's outputs

def macro(seed_dir: str) -> dict:
    """{(table, model, lp, test set key): (macro, (lo, hi))} from a finished probe folder."""
    out = {}
    for stem in ("table1", "table3"):
        path = os.path.join(seed_dir, f"{stem}.json")
        if not os.path.exists(path):
            continue
        for table in json.load(open(path)):
            for d in table.get("data", []):
                key = next((k for k, title in TEST_SETS.items() if d["test_set"].startswith(title)), None)
                if key is not None and d.get("macro") is not None:
                    out[(d["model"], d["lp"], key)] = (d["macro"], tuple(d["macro_ci"]))
    path = os.path.join(seed_dir, "table2.json")
    if os.path.exists(path):
        for table in json.load(open(path)):
            for d in table.get("data", []):
                a, b = d["adapted"], d["before"]
                out[(d["model"], "adapted", "radchest")] = (a["macro"], tuple(a["macro_ci"]))
                out[(d["model"], "before", "radchest")] = (b["macro"], tuple(b["macro_ci"]))
    return out


def fig2a(seed_dir: str) -> dict:
    path = os.path.join(seed_dir, "fig2a.json")
    return json.load(open(path)) if os.path.exists(path) else {}


# ---------------------------------------------------------------- the paper's claims, judged at every seed

def _get(m: dict, model: str, lp: str, key: str):
    v = m.get((model, lp, key))
    return None if v is None else v[0]


def _compare(ms: dict, what: str, holds, reverse=None) -> dict:
    """holds(m) -> (bool or None, figures) per seed; the verdict needs every seed. reverse(m) -> bool: the
    opposite of the paper's claim, which makes the verdict 'reversed' where it holds at every seed."""
    per_seed, figures = {}, {}
    for seed, m in ms.items():
        try:
            per_seed[seed], figures[seed] = holds(m)
        except (TypeError, KeyError):  # a number that is missing (a row not finished): not judged at that seed
            continue
    judged = [s for s in per_seed if per_seed[s] is not None]
    if not judged:
        verdict = "not measured"
    elif all(per_seed[s] for s in judged):
        verdict = "reproduced"
    elif reverse is not None and all(reverse(ms[s]) for s in judged):
        verdict = "reversed"
    else:
        verdict = f"not reproduced (holds at {sum(bool(per_seed[s]) for s in judged)} of {len(judged)} seeds)"
    if judged and len(judged) < len(ms):  # a row missing at some seed: say where the verdict comes from
        verdict += f"; measured at seed {', '.join(map(str, judged))} only"
    return {"claim": what, "verdict": verdict, "seeds": judged, "figures": figures}


def _f(*values) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def claims(ms: dict, figs: dict) -> list:
    """ms: {seed: macro dict}, figs: {seed: fig2a report}. Thresholds are stated in each claim's text."""
    g = _get
    out = [
        _compare(ms, "C1 (Table 1): S3 above Supervised on the internal 2D and 3D test sets (MIMIC, CT-RATE)",
                 lambda m: (all(g(m, "S3", "ALL", k) > g(m, "Supervised", "ALL", k) for k in INTERNAL),
                            "S3 vs Supervised: " + "; ".join(f"{TEST_SETS[k]} {_f(g(m, 'S3', 'ALL', k), g(m, 'Supervised', 'ALL', k))}" for k in INTERNAL)),
                 lambda m: all(g(m, "S3", "ALL", k) < g(m, "Supervised", "ALL", k) for k in INTERNAL)),
        _compare(ms, "C2 (Table 3 left): S2 and S3 above S1 on CT-RATE (paper 0.74 -> 0.83 / 0.85)",
                 lambda m: (min(g(m, s, "ALL", "ctrate") for s in ("S2", "S3")) > g(m, "S1", "ALL", "ctrate"),
                            "S1 / S2 / S3: " + _f(*(g(m, s, "ALL", "ctrate") for s in ("S1", "S2", "S3")))),
                 lambda m: max(g(m, s, "ALL", "ctrate") for s in ("S2", "S3")) < g(m, "S1", "ALL", "ctrate")),
        _compare(ms, "C3: 2D stable across the stages (paper MIMIC 0.82 for all three): S1, S2, S3 within 0.02 on MIMIC",
                 lambda m: (np.ptp([g(m, s, "ALL", "mimic") for s in ("S1", "S2", "S3")]) <= 0.02,
                            "S1 / S2 / S3: " + _f(*(g(m, s, "ALL", "mimic") for s in ("S1", "S2", "S3"))))),
        _compare(ms, "C4: S2 close to S3: within 0.02 on MIMIC and CT-RATE (paper 0.82 = 0.82, 0.83 vs 0.85)",
                 lambda m: (all(abs(g(m, "S2", "ALL", k) - g(m, "S3", "ALL", k)) <= 0.02 for k in INTERNAL),
                            "S2 vs S3: " + "; ".join(f"{TEST_SETS[k]} {_f(g(m, 'S2', 'ALL', k), g(m, 'S3', 'ALL', k))}" for k in INTERNAL))),
        _compare(ms, "C5 (Table 3 right): single-modality probes fail across modalities (below 0.65; paper 0.58 "
                     "and 0.53) and the ALL probe is within 0.02 of the modality's own probe (S3)",
                 lambda m: (g(m, "S3", "2D", "ctrate") < 0.65 and g(m, "S3", "3D", "mimic") < 0.65
                            and g(m, "S3", "2D", "mimic") - g(m, "S3", "ALL", "mimic") <= 0.02
                            and g(m, "S3", "3D", "ctrate") - g(m, "S3", "ALL", "ctrate") <= 0.02,
                            f"LP 2D on CT-RATE {g(m, 'S3', '2D', 'ctrate'):.3f}, LP 3D on MIMIC {g(m, 'S3', '3D', 'mimic'):.3f}; "
                            f"MIMIC 2D vs ALL {_f(g(m, 'S3', '2D', 'mimic'), g(m, 'S3', 'ALL', 'mimic'))}; "
                            f"CT-RATE 3D vs ALL {_f(g(m, 'S3', '3D', 'ctrate'), g(m, 'S3', 'ALL', 'ctrate'))}")),
        _compare(ms, "C6 (Table 2): the probe retrained on the external 3D set gains there (S3; paper +0.09)",
                 lambda m: (g(m, "S3", "adapted", "radchest") > g(m, "S3", "before", "radchest"),
                            "before -> adapted: " + _f(g(m, "S3", "before", "radchest"), g(m, "S3", "adapted", "radchest"))),
                 lambda m: g(m, "S3", "adapted", "radchest") < g(m, "S3", "before", "radchest")),
        _compare({s: figs[s] for s in figs if figs[s]}, "C7 (Figure 2a, Cardiomegaly): each modality-specific fit "
                 "loses at least 0.1 on the other modality, the joint fit is within 0.05 of each specific fit on its "
                 "own modality, and the three fits lean on different top-3 components", _fig2a_claim),
    ]
    for row in ("S1", "S2", "S3"):
        out.append(_compare(
            ms, f"{row} above the random initialisation on all four test sets (not in the paper; what any "
                f"self-supervised row must show)",
            lambda m, r=row: (all(g(m, r, "ALL", k) > g(m, RANDOM, "ALL", k) for k in TEST_SETS),
                              "; ".join(f"{TEST_SETS[k]} {_f(g(m, r, 'ALL', k), g(m, RANDOM, 'ALL', k))}" for k in TEST_SETS)),
            lambda m, r=row: all(g(m, r, "ALL", k) < g(m, RANDOM, "ALL", k) for k in TEST_SETS)))
    out.append(_compare(
        ms, "Goal: S3 above the random initialisation with 95% CIs that do not overlap on both internal sets",
        lambda m: (all(m[("S3", "ALL", k)][1][0] > m[(RANDOM, "ALL", k)][1][1] for k in INTERNAL),
                   "; ".join(f"{TEST_SETS[k]} S3 {_ci(m[('S3', 'ALL', k)])} vs {_ci(m[(RANDOM, 'ALL', k)])}" for k in INTERNAL))))
    return out


def _ci(v) -> str:
    return f"{v[0]:.3f} ({v[1][0]:.3f}-{v[1][1]:.3f})"


def _fig2a_claim(report: dict):
    card = report["labels"]["Cardiomegaly"]
    a = {fit: (card[fit]["auroc"]["mimic"], card[fit]["auroc"]["ctrate"]) for fit in ("2D", "3D", "joint")}
    tops = {fit: frozenset(card[fit]["top_pcs"]) for fit in a}
    holds = (a["2D"][0] - a["2D"][1] >= 0.1 and a["3D"][1] - a["3D"][0] >= 0.1
             and a["2D"][0] - a["joint"][0] <= 0.05 and a["3D"][1] - a["joint"][1] <= 0.05
             and len(set(tops.values())) == 3)
    figures = "; ".join(f"{fit} fit: 2D {v[0]:.3f}, 3D {v[1]:.3f}, top {'/'.join(card[fit]['top_pcs'])}"
                        for fit, v in a.items())
    return holds, figures


# ---------------------------------------------------------------- results/: the tables over seeds

def cell(ms: dict, model: str, lp: str, key: str) -> str:
    """First seed's macro (95% CI) and, with more seeds, mean +- sd over them."""
    seeds = [s for s, m in ms.items() if (model, lp, key) in m]
    values = [ms[s][(model, lp, key)] for s in seeds]
    if not values:
        return "-"
    text = _ci(values[0]) if seeds[0] == next(iter(ms)) else f"seed {seeds[0]}: {_ci(values[0])}"  # not the first seed's
    if len(values) > 1:
        v = [x[0] for x in values]
        text += f"; {np.mean(v):.3f} ± {np.std(v, ddof=1):.3f} (n={len(v)})"
    return text


def table(ms: dict, rows: list, title: str) -> list:
    lines = [f"**{title}**", "", "| Model | LP | " + " | ".join(TEST_SETS.values()) + " |",
             "| --- | --- |" + " --- |" * len(TEST_SETS)]
    lines += [f"| {model} | {lp} | " + " | ".join(cell(ms, model, lp, k) for k in TEST_SETS) + " |"
              for model, lp in rows]
    return lines + [""]


HEALTH_COLUMNS = (("rank_2d", "rank 2D"), ("rank_3d", "rank 3D"), (f"rank_2d_{GOAL_N_2D}", f"rank {GOAL_N_2D} radiographs"),
                  ("top_2d", "top dir. 2D"), ("top_3d", "top dir. 3D"), ("top_mixed", "top dir. mixed"),
                  (f"proj_rank_2d_{GOAL_N_2D}", f"projector rank {GOAL_N_2D} radiographs"),
                  ("sigreg_end", "SIGReg at end"), ("sigreg_gaussian", "SIGReg of a Gaussian batch"))


def health_table(hs: dict) -> list:
    lines = [f"**Embedding health** (backbone unless named; {HEALTH_N} held-out phantom test samples per modality, "
             f"whole views; effective rank, top direction's share of the variance; SIGReg: the run's last logged "
             f"value beside an isotropic Gaussian batch of the training batch's size; mean over seeds)", "",
             "| Model | " + " | ".join(name for _, name in HEALTH_COLUMNS) + " |", "| --- |" + " --- |" * len(HEALTH_COLUMNS)]
    for model in (*ROWS, RANDOM):
        rows = [h[model] for h in hs.values() if model in h]
        if not rows:
            continue
        cells = []
        for key, _ in HEALTH_COLUMNS:
            v = [r[key] for r in rows if key in r]
            cells.append("-" if not v else (f"{np.mean(v):.0%}" if key.startswith("top") else f"{np.mean(v):.2f}"))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines + [""]


def summarize(args) -> dict:
    """Rewrite args.out from the finished probes: summary.md/.json, each seed's outputs in seed<s>/."""
    ms, figs, hs = {}, {}, {}
    for seed in args.seeds:
        root = os.path.join(args.runs, f"seed{seed}")
        folder = os.path.join(root, "probe")
        if not os.path.exists(os.path.join(folder, "table1.json")):
            continue
        ms[seed], figs[seed] = macro(folder), fig2a(folder)
        path = os.path.join(root, "health.json")
        if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(os.path.join(folder, "table1.json")):
            data.atomic_write(path, lambda f: f.write(json.dumps(health(grid_rows(root, args.steps), seed), indent=1).encode()))
        hs[seed] = json.load(open(path))
        dest = os.path.join(args.out, f"seed{seed}")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("cache", "*.log"))
        shutil.copy(path, os.path.join(dest, "health.json"))
    if not ms:
        return {}
    judged = claims(ms, figs)
    command = f"python reproduce.py {' '.join(a for a in sys.argv[1:] if a != '--summarize')}".rstrip()  # the grid's
    lines = [f"# The paper's experiments on phantom chests, {len(ms)} seed(s): {', '.join(map(str, ms))}", "",
             f"Written by `{command}`; every cell: seed "
             f"{next(iter(ms))}'s macro AUROC (95% bootstrap CI over patients) and the mean ± sd over seeds. "
             "Per-label tables, Figure 2a/2b and the training curves of each seed are in seed<s>/.", ""]
    lines += table(ms, [("S3", "ALL"), ("Supervised", "ALL"), (RANDOM, "ALL")], "Table 1 (LP ALL)")
    lines += table(ms, [("S1", "ALL"), ("S2", "ALL"), ("S3", "ALL"), (RANDOM, "ALL")], "Table 3 left: training strategy (LP ALL)")
    lines += table(ms, [("S3", "2D"), ("S3", "3D"), ("S3", "ALL")], "Table 3 right: modality robustness (S3)")
    lines += ["**Table 2** (S3, RAD-ChestCT test: the ALL probe, and a probe retrained on RAD-ChestCT train)", "",
              "| seed | before | adapted | gain |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {_ci(m[('S3', 'before', 'radchest')])} | {_ci(m[('S3', 'adapted', 'radchest')])} | "
              f"{m[('S3', 'adapted', 'radchest')][0] - m[('S3', 'before', 'radchest')][0]:+.3f} |"
              for s, m in ms.items() if ("S3", "adapted", "radchest") in m] + [""]
    lines += health_table(hs)
    lines += ["**The paper's claims**, each judged at every seed", "", "| claim | verdict | figures by seed |",
              "| --- | --- | --- |"]
    lines += [f"| {c['claim']} | {c['verdict']} | " + "<br>".join(f"{s}: {f}" for s, f in c["figures"].items()) + " |"
              for c in judged]
    os.makedirs(args.out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    data.atomic_write(os.path.join(args.out, "summary.md"), lambda f: f.write(text.encode()))
    blob = {"command": command, "seeds": list(ms), "macro": {str(s): {"|".join(k): v for k, v in m.items()} for s, m in ms.items()},
            "health": {str(s): h for s, h in hs.items()}, "claims": judged}
    data.atomic_write(os.path.join(args.out, "summary.json"),
                      lambda f: f.write(json.dumps(blob, indent=1, default=list).encode()))
    return blob


# ---------------------------------------------------------------- the README's results block, from results/

README_GRID = "results/grid-2000steps"  # the grid whose summary the README states
README_BEGIN, README_END = "<!-- results: written by `python reproduce.py --readme`; do not edit -->", "<!-- results: end -->"


def readme_block(summary: dict, folder: str = README_GRID) -> str:
    """The README's results section: the headline table (LP ALL, every row, every seed) and one line per claim,
    from a grid's summary.json; tests/test_readme.py fails when the README's copy differs."""
    seeds, link = summary["seeds"], f"{folder}/summary.md"
    ms = {int(s): {tuple(k.split("|")): (v[0], tuple(v[1])) for k, v in m.items()} for s, m in summary["macro"].items()}
    lines = [README_BEGIN, f"From [{link}]({link}), written by `{summary['command']}` (phantom chests, CPU demo "
             f"recipe). LP ALL macro AUROC on the stand-ins of the paper's four test sets, seed {seeds[0]} with its "
             f"95% bootstrap CI" + (f"; then seed{'s' * (len(seeds) > 2)} {', '.join(map(str, seeds[1:]))}" if
                                    len(seeds) > 1 else "") + ":", "",
             "| Model | " + " | ".join(TEST_SETS.values()) + " |", "| --- |" + " --- |" * len(TEST_SETS)]
    for model in (*ROWS, RANDOM):
        cells = []
        for k in TEST_SETS:
            v = [ms[s].get((model, "ALL", k)) for s in seeds]
            cells.append("; ".join(["-" if v[0] is None else _ci(v[0])] +
                                   ["-" if x is None else f"{x[0]:.3f}" for x in v[1:]]))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    s3 = [summary["health"][str(s)].get("S3", {}) for s in seeds]
    if all("sigreg_end" in h for h in s3):
        lines += ["", "S3's embedding at the end, by seed: SIGReg " + " / ".join(f"{h['sigreg_end']:.2f}" for h in s3) +
                  f" (an isotropic Gaussian batch: {s3[0]['sigreg_gaussian']:.2f}); effective rank within "
                  f"{GOAL_N_2D} radiographs, backbone " + " / ".join(f"{h[f'rank_2d_{GOAL_N_2D}']:.1f}" for h in s3) +
                  ", projector " + " / ".join(f"{h[f'proj_rank_2d_{GOAL_N_2D}']:.1f}" for h in s3) + "."]
    lines += ["", "The paper's claims, each judged at every seed:", ""]
    lines += [f"- {c['claim']}: **{c['verdict']}**. " + "; ".join(f"seed {s}: {f}" for s, f in c["figures"].items())
              for c in summary["claims"]]
    return "\n".join(lines + [README_END])


def write_readme(path: str = "README.md", folder: str = README_GRID) -> bool:
    """Replace the README's results block with the one folder's summary.json gives -> whether it changed."""
    text = open(path).read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path}: no results block (the lines {README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    new = head + readme_block(json.load(open(os.path.join(folder, "summary.json"))), folder) + rest.split(README_END, 1)[1]
    if new != text:
        data.atomic_write(path, lambda f: f.write(new.encode()))
    return new != text


def main(argv=None) -> int:
    args = get_args(argv)
    if args.readme:
        print("README.md: results block " + ("rewritten" if write_readme() else "already current") +
              f" from {README_GRID}/summary.json")
        return 0
    jobs = plan(args)
    if args.summarize:
        print("wrote", args.out) if summarize(args) else print("reproduce.py: no finished probe yet")
        return 0
    print_plan(jobs, args)
    if args.dry_run:
        return 0
    run_jobs(jobs, args)
    summarize(args)
    print(f"\nwrote {os.path.join(args.out, 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
