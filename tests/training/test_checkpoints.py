"""Checkpoints: safetensors weights, weights-only resume files, the metrics CSV."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from d4m.dicom_io.errors import InputError
from d4m.training.checkpoints import (
    MetricsLog,
    load_resume,
    load_weights,
    save_resume,
    save_weights,
)


def _net(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.Conv2d(width, 1, 1))


def test_weights_round_trip_including_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = _net()
    src[1].running_mean.fill_(0.5)
    save_weights(src, tmp_path / "model.safetensors", {"stage": "test"})
    dst = _net()
    report = load_weights(dst, tmp_path / "model.safetensors")
    assert report.clean
    for key, value in src.state_dict().items():
        assert torch.equal(value, dst.state_dict()[key]), key
    assert not list(tmp_path.glob(".*partial")), "no temporary file is left behind"


def test_mismatched_weights_name_the_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(_net(4), path)
    with pytest.raises(InputError, match=r"model.safetensors: expected the \d+ tensors of a Sequential, found "
                                         r"shape mismatch \[0.weight \(4, 1, 3, 3\) vs \(8, 1, 3, 3\)"):
        load_weights(_net(8), path)
    bigger = nn.Sequential(*_net(4), nn.Conv2d(1, 1, 1))
    with pytest.raises(InputError, match=r"missing \[3.weight, 3.bias\] \(2\)"):
        load_weights(bigger, path)
    report = load_weights(bigger, path, strict=False)
    assert report.missing == ("3.weight", "3.bias") and not report.mismatched
    with pytest.raises(InputError, match="nowhere.safetensors: expected a safetensors weights file, found nothing"):
        load_weights(_net(), tmp_path / "nowhere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="junk.safetensors: expected a safetensors weights file, found an unreadable"):
        load_weights(_net(), tmp_path / "junk.safetensors")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while loading",))


def test_resume_files_are_atomic_and_weights_only(tmp_path: Path) -> None:
    net = _net()
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 1, 5, 5)).sum().backward()
    optimizer.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "seed": [3, 2**70]}
    save_resume(tmp_path / "resume.pt", state)
    loaded = load_resume(tmp_path / "resume.pt")
    assert loaded["step"] == 7 and loaded["seed"] == [3, 2**70]
    assert torch.equal(loaded["rng"], state["rng"])
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(InputError, match=r"evil.pt: expected a resume file readable with weights_only, found "
                                         r"Unsupported global: GLOBAL print was not an allowed global"):
        load_resume(tmp_path / "evil.pt")
    with pytest.raises(InputError, match="expected a resume file, found nothing"):
        load_resume(tmp_path / "missing.pt")


def test_metrics_log_appends_and_truncates(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.csv", ("step", "loss"))
    for step in range(1, 6):
        log.append({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in log.rows()] == ["1", "2", "3", "4", "5"]
    log.truncate(3)
    log.append({"step": 4, "loss": 0.1})
    assert [r["step"] for r in MetricsLog(tmp_path / "metrics.csv", ("step", "loss")).rows()] == ["1", "2", "3", "4"]
    with pytest.raises(InputError, match=r"expected only the columns \['step', 'loss'\], found \['acc'\]"):
        log.append({"step": 5, "acc": 1.0})
    with pytest.raises(InputError, match=r"expected the columns \['step', 'other'\]"):
        MetricsLog(tmp_path / "metrics.csv", ("step", "other"))
