"""Flip test-time augmentation lives inside the exported model: a photo and its mirror image
get the same answer from every engine, and --no-flip exports the plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.engines.ort import OrtEngine
from models.bundle import load_bundle
from tests.conftest import TrainedDemo, storyscan


def mirror_gap(model: Path, size: int) -> float:
    """Largest output difference between photos and their mirror images."""
    engine = OrtEngine(model, "fp32")
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    a, b = engine.infer(x), engine.infer(np.ascontiguousarray(x[:, :, :, ::-1]))
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
def test_bundles_average_each_photo_with_its_mirror_image(trained_demo: TrainedDemo,
                                                          tmp_path: Path) -> None:
    bundle = load_bundle(trained_demo.bundle)
    assert bundle.manifest["test_time"] == "flip-average"
    for precision in ("fp32", "int8"):
        assert mirror_gap(bundle.model_path(precision), bundle.input_spec.size) < 1e-5

    result = storyscan("export", trained_demo.run / "best.pt", "--data", trained_demo.data,
                       "--out", tmp_path / "plain", "--no-flip", "--force")
    assert result.returncode == 0, result.stderr
    plain = load_bundle(tmp_path / "plain")
    assert plain.manifest["test_time"] == "none"
    assert mirror_gap(plain.model_path("fp32"), plain.input_spec.size) > 1e-3
