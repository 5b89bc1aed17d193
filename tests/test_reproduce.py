"""reproduce.py: the grid's plan, what counts as done (resume), and the claims judged at every seed."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import reproduce
from test_train import ROOT, TINY


def args_for(tmp_path, *extra):
    return reproduce.get_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *extra])


def test_plan_chains_stage_2_from_stage_1_of_the_same_seed_and_every_run_resumes(tmp_path):
    jobs = reproduce.plan(args_for(tmp_path, "--seeds", "3", "5", "--steps", "7"))
    assert [(s, n) for s, n, *_ in jobs] == [(s, n) for s in (3, 5) for n in (*reproduce.ROWS, "probe")]
    for seed, name, kind, argv, folder in jobs:
        if kind == "train":
            assert argv[argv.index("--seed") + 1] == str(seed) and argv[argv.index("--steps") + 1] == "7"
            assert argv[argv.index("--resume") + 1] == "auto" and argv[argv.index("--out") + 1] == folder
    s2 = next(argv for seed, name, _, argv, _ in jobs if (seed, name) == (5, "S2"))
    assert s2[s2.index("--init") + 1] == str(tmp_path / "runs" / "seed5" / "s1" / "last.pt")
    probe = next(argv for seed, name, _, argv, _ in jobs if (seed, name) == (5, "probe"))
    assert "--random-init" in probe and probe[probe.index("--seed") + 1] == "5"
    assert "Supervised=" + str(tmp_path / "runs" / "seed5" / "supervised" / "last.pt") in probe


def test_a_run_is_done_only_at_the_planned_step_and_a_probe_only_after_its_checkpoints(tmp_path):
    args = args_for(tmp_path, "--seeds", "0", "--steps", "4")
    jobs = {job[1]: job for job in reproduce.plan(args)}
    s1 = jobs["S1"][4]
    os.makedirs(s1)
    assert not reproduce.is_done(jobs["S1"], args)
    torch.save({"step": 3}, os.path.join(s1, "last.pt"))  # killed at step 3: resumed, not skipped
    assert not reproduce.is_done(jobs["S1"], args) and reproduce.trained_step(s1) == 3
    torch.save({"step": 4}, os.path.join(s1, "last.pt"))
    assert reproduce.is_done(jobs["S1"], args)
    folder = jobs["probe"][4]
    os.makedirs(folder)
    for row in ("s2", "s3", "supervised"):
        os.makedirs(os.path.join(os.path.dirname(folder), row))
        torch.save({"step": 4}, os.path.join(os.path.dirname(folder), row, "last.pt"))
    past = time.time() - 100
    for row in ("s1", "s2", "s3", "supervised"):
        os.utime(os.path.join(os.path.dirname(folder), row, "last.pt"), (past, past))
    assert not reproduce.is_done(jobs["probe"], args)
    with open(os.path.join(folder, "table1.json"), "w") as f:
        f.write("[]")
    assert reproduce.is_done(jobs["probe"], args)
    os.utime(os.path.join(os.path.dirname(folder), "s3", "last.pt"))  # a checkpoint newer than the tables: redo
    assert not reproduce.is_done(jobs["probe"], args)


def macro(values: dict) -> dict:
    """{(model, lp, test set): macro} -> the probe-output dict with a CI of +- 0.01."""
    return {k: (v, (v - 0.01, v + 0.01)) for k, v in values.items()}


def c1(s3_mimic, sup_mimic, s3_ct, sup_ct):
    return macro({("S3", "ALL", "mimic"): s3_mimic, ("Supervised", "ALL", "mimic"): sup_mimic,
                  ("S3", "ALL", "ctrate"): s3_ct, ("Supervised", "ALL", "ctrate"): sup_ct})


def verdict(ms: dict, index: int = 0) -> str:
    return reproduce.claims(ms, {})[index]["verdict"]


def test_a_claim_is_reproduced_only_where_it_holds_at_every_seed():
    assert verdict({0: c1(0.8, 0.7, 0.9, 0.8), 1: c1(0.81, 0.7, 0.88, 0.8)}) == "reproduced"
    assert verdict({0: c1(0.8, 0.7, 0.9, 0.8), 1: c1(0.6, 0.7, 0.88, 0.8)}) == \
        "not reproduced (holds at 1 of 2 seeds)"
    assert verdict({0: c1(0.6, 0.7, 0.7, 0.8), 1: c1(0.6, 0.7, 0.7, 0.8)}) == "reversed"
    assert verdict({0: {}}) == "not measured"  # rows not finished are not judged
    assert verdict({0: {}, 1: c1(0.8, 0.7, 0.9, 0.8)}) == "reproduced; measured at seed 1 only"  # says where from


def test_figures_beside_each_verdict_name_the_numbers_of_every_seed():
    judged = reproduce.claims({0: c1(0.8, 0.7, 0.9, 0.8), 4: c1(0.81, 0.7, 0.88, 0.8)}, {})[0]
    assert judged["seeds"] == [0, 4]
    assert "0.800 / 0.700" in judged["figures"][0] and "0.880 / 0.800" in judged["figures"][4]


def test_cells_give_the_first_seeds_ci_and_the_spread_over_seeds():
    ms = {0: c1(0.8, 0.7, 0.9, 0.8), 1: c1(0.9, 0.7, 0.9, 0.8)}
    text = reproduce.cell(ms, "S3", "ALL", "mimic")
    assert text.startswith("0.800 (0.790-0.810)") and f"{np.mean([0.8, 0.9]):.3f} ± {np.std([0.8, 0.9], ddof=1):.3f}" in text
    assert reproduce.cell(ms, "S1", "ALL", "mimic") == "-"
    assert reproduce.cell({0: {}, 1: c1(0.9, 0.7, 0.9, 0.8)}, "S3", "ALL", "mimic").startswith("seed 1: 0.900")


def test_health_figures_behave_as_defined():
    rng = np.random.default_rng(0)
    line = np.outer(rng.normal(size=64), rng.normal(size=16))
    assert reproduce.top_share(line) == pytest.approx(1.0) and reproduce.rank(line) == pytest.approx(1.0, abs=1e-3)
    iso = rng.normal(size=(4096, 8))
    assert reproduce.top_share(iso) == pytest.approx(1 / 8, rel=0.15) and reproduce.rank(iso) > 7.5
    # an isotropic Gaussian batch scores about 1 (lejepa.py's test pins the statistic itself)
    assert 0.5 < reproduce.gaussian_sigreg(32, 128) < 2.0
    # 24 Gaussian samples cannot show more than 24 directions, and show most of them in 128 or in 16 dimensions
    assert 18 < reproduce.gaussian_rank(24, 128) < 24 and 9 < reproduce.gaussian_rank(24, 16) < 16


def test_health_leaves_out_a_run_that_did_not_reach_its_steps(tmp_path):
    """A run stopped early (a killed grid's partial row) must not be reported as that row's health."""
    (tmp_path / "supervised").mkdir()
    torch.save({"step": 27}, tmp_path / "supervised" / "last.pt")
    assert reproduce.health(reproduce.grid_rows(str(tmp_path), steps=1000), seed=0) == {}


def test_ctrl_c_reaches_the_run_once_and_waits_for_its_checkpoint(tmp_path):
    """A Ctrl-C to reproduce.py is passed on to the training run once (not a second time from the process group,
    which would make train.py stop without finishing its step) and waited for: the run checkpoints, the grid
    exits 130 with one line saying how to continue. subprocess.call killed the run and lost its steps."""
    runs, out = tmp_path / "runs", tmp_path / "runs" / "seed0" / "s3"
    argv = ["train.py", *TINY, "--steps", "1000", "--out", str(out), "--resume", "auto"]
    script = (f"import reproduce; args = reproduce.get_args(['--runs', {str(runs)!r}, '--steps', '1000']); "
              f"reproduce.run_jobs([(0, 'S3', 'train', {argv!r}, {str(out)!r})], args)")
    grid = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics, start = out / "metrics.jsonl", time.time()
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert grid.poll() is None and time.time() - start < 300, "the run did not start"
        time.sleep(0.2)
    grid.send_signal(signal.SIGINT)
    assert grid.wait(timeout=300) == 130
    err = grid.stderr.read().strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("reproduce.py: SIGINT: seed 0 S3 stopped")
    assert 1 <= torch.load(out / "last.pt", weights_only=True, map_location="cpu")["step"] < 1000
    assert (out / "train.log").read_text().count("SIGINT: finishing this step") == 1  # heard once: no "stop now"
