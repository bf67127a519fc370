"""The one device policy and the one CPU-thread policy (pipelines.compute)."""

from __future__ import annotations

import logging

import pytest
import torch

from pipelines.compute import select_device, set_threads


def test_auto_takes_cuda_only_when_present_and_cpu_is_cpu():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "mps", "", "cuda:x"])
def test_other_names_are_refused(name):
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        select_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_missing_cuda_is_an_error_unless_a_fallback_log_is_given(caplog):
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        select_device("cuda:1")
    log = logging.getLogger("test.compute")
    with caplog.at_level(logging.WARNING, logger="test.compute"):
        assert select_device("cuda", fallback_log=log) == torch.device("cpu")
    assert "running on CPU" in caplog.text


def test_threads_given_else_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
