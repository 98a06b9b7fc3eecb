"""`storyscan compare`: one table, one row per architecture, numbers a user can trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import storyscan
from trainer.compare import count_macs, count_params


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.synthetic import generate_demo

    root = tmp_path_factory.mktemp("compare") / "data"
    generate_demo(root, products=4, train=8, val=3, scans=0, size=96, seed=3)
    return root


def test_count_macs_matches_hand_count() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8x8 outputs, 3*3*3 MACs each: 13,824
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise, 8x4x4 outputs x 9: 1,152
        nn.Conv2d(8, 16, 1),  # 16x4x4 outputs x 8: 2,048
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),  # 5 outputs x 16: 80
    )
    assert count_macs(net, 8) == 13_824 + 1_152 + 2_048 + 80


class _UnusedHead(nn.Module):
    """Like a backbone with its ImageNet classifier: `fc` is never run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # 4*3*3*3 + 4 = 112 parameters
        self.gain = nn.Parameter(torch.ones(4))  # a parameter of the root module itself: 4
        self.fc = nn.Linear(100, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)) * self.gain


def test_count_params_counts_only_what_a_forward_pass_uses() -> None:
    assert count_params(_UnusedHead(), 8) == 112 + 4


@pytest.mark.slow
def test_compare_two_archs(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = storyscan("compare", "--archs", "resnet18:none,efficientnet_lite0",
                       "--data", tiny_data, "--size", 64, "--epochs", 1, "--out", out,
                       "--markdown", tmp_path / "table.md")
    assert result.returncode == 0, result.stderr

    stdout = result.stdout.splitlines()
    header = max(i for i, ln in enumerate(stdout) if ln.startswith("arch "))
    assert "INT8 top-1" in stdout[header] and "INT8 p50 ms" in stdout[header]
    rows = stdout[header + 2 : header + 4]
    assert [r.split()[:2] for r in rows] == [["resnet18", "none"],
                                             ["efficientnet_lite0", "imagenet"]]
    assert len((tmp_path / "table.md").read_text().splitlines()) == 2 + 2

    resnet, lite0 = json.loads((out / "compare.json").read_text())["results"]
    assert 11.2 < resnet["params_m"] < 11.5  # ResNet-18 without its 1000-class fc, plus heads
    assert 3.5 < lite0["params_m"] < 4.0
    assert resnet["gmacs"] == pytest.approx(1.814 * (64 / 224) ** 2, rel=0.01)
    assert 0 < lite0["gmacs"] < resnet["gmacs"]
    for r in (resnet, lite0):
        assert 0 <= r["int8_top1"] <= r["int8_top5"] <= 1
        assert 0 <= r["fp32_top1"] <= 1 and 0 <= r["int8_macro_f1"] <= 1
        assert r["latency_ms"] > 0 and r["train_min"] > 0
        assert r["val_photos"] == 4 * 3
        assert (Path(r["bundle"]) / "model_int8.onnx").is_file()


@pytest.mark.parametrize("arch, needle", [
    ("resnet99", "unknown architecture 'resnet99'"),
    ("resnet50:no-such-weights.pt", "weights file not found"),
])
def test_bad_arch_stops_before_training_with_one_line(tiny_data: Path, tmp_path: Path,
                                                      arch: str, needle: str) -> None:
    result = storyscan("compare", "--archs", f"resnet18:none,{arch}", "--data", tiny_data,
                       "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("storyscan: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert not (tmp_path / "out").exists()  # the good arch before it was not trained
