"""The command lines: every flag explains itself and its default; output that reads well in a log file."""
import argparse
import os
import subprocess
import sys

import pytest

import bench
import data
import features
import probe
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Parsed(Exception):
    pass


def parsers(monkeypatch, build, argv) -> list:
    """The argparse parsers `build(argv)` makes (sub-commands' too), caught at parse_args."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed):
        build(argv)
    for p in list(seen):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                seen += action.choices.values()
    return seen


SCRIPTS = {"train.py": (train.get_args, []), "bench.py": (bench.get_args, []), "data.py": (data.main, []),
           "probe.py": (probe.get_args, []), "probe.py embed": (features.embed_args, []), "probe.py curves": (probe.curves, [])}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_that_states_its_default(script, monkeypatch):
    build, argv = SCRIPTS[script]
    found = parsers(monkeypatch, build, argv)
    assert found
    for p in found:
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            assert all(a.help for a in p._subparsers._group_actions[0]._choices_actions), p.prog  # what each command does
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{p.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{name}: no help"
            concrete = action.default not in (None, False, [], "", argparse.SUPPRESS)
            if concrete and not action.required:
                assert "default" in action.help, f"{name}: the help does not say the default ({action.default!r})"


def test_train_out_follows_the_stage():
    assert train.get_args(["--stage", "1"]).out == "runs/stage1"
    assert train.get_args([]).out == "runs/stage3"
    assert train.get_args(["--objective", "supervised"]).out == "runs/stage3-supervised"
    assert train.get_args(["--stage", "1", "--out", "x"]).out == "x"


def test_a_log_file_gets_one_line_per_logged_step_not_a_progress_bar(tmp_path):
    """stdout and stderr not terminals (a job's log): no carriage-return bar, plain lines instead."""
    res = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--depth", "1", "--size-2d", "28",
                          "--size-3d", "28", "--n-2d", "8", "--n-3d", "4", "--batch-2d", "4", "--batch-3d", "2",
                          "--n-local", "2", "--proj-hidden", "64", "--steps", "2", "--log-every", "1",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert lines[-1].startswith("done at step 2")
