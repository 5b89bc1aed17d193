"""pytest set-up: the repo root on sys.path (flat layout), the `gpu` marker, shared helpers."""
import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on machines without a GPU")
    # torch.compile's own use of a deprecated torch.jit API (the compile test): not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
