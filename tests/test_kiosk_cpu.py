"""A bundle exported on a workstation, run by a kiosk with another CPU: AVX2 only, or Arm.

ONNX Runtime's INT8 kernels differ between CPUs (int16 pair sums on AVX2, NEON, dot-product
or matrix-multiply instructions on Arm), so what the exporter measured is not automatically
what a kiosk computes. These tests run the kiosk side in a process that sees an AVX2-only CPU
(the real AVX2 kernels, selected by CPUID) or in an Arm Python under qemu (the Arm kernels,
emulated instruction by instruction), both from bench/emulated_cpu.py, and skip where this
machine cannot do that, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TrainedDemo, storyscan
from test_int8 import calibration_photos, small_network

from bench.emulated_cpu import ARM_CPUS, ArmKiosk, EmulationUnavailable, arm_kiosk, avx2_only_env
from device.catalog import Catalog
from device.importers import read_products
from trainer.quantize import QuantOptions, quantize_int8


@pytest.fixture(scope="module")
def avx2_kiosk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables for a process that sees an AVX2-only CPU."""
    try:
        return avx2_only_env(tmp_path_factory.mktemp("avx2"))
    except EmulationUnavailable as e:
        pytest.skip(f"cannot emulate an AVX2-only kiosk: {e}")


@pytest.fixture(scope="module")
def arm() -> ArmKiosk:
    """An Arm kiosk's Python under qemu (fetched once into ~/.cache/storyscan)."""
    try:
        return arm_kiosk()
    except EmulationUnavailable as e:
        pytest.skip(f"cannot emulate an Arm kiosk: {e}")


def run_python(code: str, *args: str | Path, env: dict[str, str] | None = None,
               python: list[str] | None = None) -> str:
    done = subprocess.run([*(python or [sys.executable]), "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout


EMBED = """
import sys, numpy as np
from device.engines.ort import OrtEngine
x = np.load(sys.argv[2])
np.save(sys.argv[3], OrtEngine(sys.argv[1], "int8").infer(x)["embedding"])
"""


def test_the_emulated_kiosk_runs_the_avx2_int8_kernels(tmp_path: Path,
                                                       avx2_kiosk: dict[str, str]) -> None:
    """The check that the emulation is real: 8-bit weights saturate the AVX2 kernel's int16
    sums on test_int8.py's network (15% of the embedding's range on a real AVX2 machine),
    7-bit weights cannot, so those give this machine's output exactly."""
    small_network(tmp_path / "fp32.onnx")
    np.save(tmp_path / "x.npy", np.stack(calibration_photos()[:8]))
    gaps = {}
    for bits, reduce_range in ((8, False), (7, True)):
        model = tmp_path / f"int8_{bits}.onnx"
        quantize_int8(tmp_path / "fp32.onnx", model, calibration_photos(),
                      QuantOptions(fp32_convs=0, fp32_sensitive=0, reduce_range=reduce_range))
        run_python(EMBED, model, tmp_path / "x.npy", tmp_path / "here.npy")
        run_python(EMBED, model, tmp_path / "x.npy", tmp_path / "avx2.npy", env=avx2_kiosk)
        here, avx2 = np.load(tmp_path / "here.npy"), np.load(tmp_path / "avx2.npy")
        gaps[bits] = float(np.abs(avx2 - here).max() / np.abs(here).max())
    assert gaps[8] > 0.05
    assert gaps[7] == 0.0


SELF_TEST = """
import sys
from device.updates import self_test
from models.bundle import load_bundle
print(self_test(load_bundle(sys.argv[1])))
"""


CLI = "import sys; sys.argv[0] = 'storyscan'; from device.cli import main; main()"


def scanned(bundle: Path, catalog: Path, scans: Path, env: dict[str, str] | None = None,
            python: list[str] | None = None) -> dict[str, tuple[str | None, float, float]]:
    """Each scan's answer (None: unknown), best similarity and the runner-up product's, from
    `storyscan scan` run by this machine's Python or by `python`."""
    args = ("scan", scans, "--bundle", bundle, "--catalog", catalog, "--json")
    if python is None:
        done = storyscan(*args, env=env)
        assert done.returncode == 0, done.stderr
        out = done.stdout
    else:
        out = run_python(CLI, *args, env=env, python=python)
    rows = [json.loads(line) for line in out.splitlines()]
    return {Path(r["source"]).name: (r["sku"], r["similarity"],
                                     r["alternatives"][0]["similarity"] if r["alternatives"]
                                     else -1.0) for r in rows}


def first_scans(scans: Path, per_product: int, dest: Path) -> Path:
    """A copy of the scans folder with each product's first `per_product` photos."""
    for photo in sorted(scans.rglob("*.jpg")):
        if int(photo.stem.rsplit("_", 1)[1]) < per_product:
            copy = dest / photo.relative_to(scans)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, copy)
    return dest


def check_kiosk(trained_demo: TrainedDemo, tmp_path: Path, env: dict[str, str],
                python: list[str] | None = None, per_product: int = 8) -> str:
    """The kiosk (env, python) passes the bundle's self-test and scans, each product's first
    `per_product` photos, as this machine does; returns what its Python says of its machine."""
    # the kiosk's own catalog: it embeds the reference photos itself, on its own CPU
    catalog = tmp_path / "catalog.db"
    Catalog(catalog).upsert(read_products(trained_demo.data / "catalog"))
    said = run_python("import platform; print(platform.machine())\n" + SELF_TEST,
                      trained_demo.bundle, env=env, python=python)
    assert "self-test passed" in said
    scans = first_scans(trained_demo.data / "scans", per_product, tmp_path / "scans")
    here = scanned(trained_demo.bundle, trained_demo.catalog, scans)
    there = scanned(trained_demo.bundle, catalog, scans, env=env, python=python)
    assert there.keys() == here.keys() == {p.name for p in scans.rglob("*.jpg")}
    assert sum(sku is not None for sku, *_ in here.values()) >= len(here) // 2
    # never another product, unless two were as near as the CPUs' sums move a similarity
    # (below); a scan right at the unknown threshold may fall either side of it
    assert all(there[n][0] == here[n][0] for n in here
               if here[n][0] is not None and there[n][0] is not None
               and here[n][1] - here[n][2] >= 0.05)
    # the int16 sums of an AVX2 CPU move a best similarity by up to 0.023 on this model
    assert max(abs(there[n][1] - here[n][1]) for n in here) < 0.05
    assert sum(there[n][0] == here[n][0] for n in here) >= 0.95 * len(here)
    return said.split()[0]


def test_a_bundle_made_here_passes_its_self_test_and_scans_alike_on_an_avx2_kiosk(
        trained_demo: TrainedDemo, avx2_kiosk: dict[str, str], tmp_path: Path) -> None:
    check_kiosk(trained_demo, tmp_path, avx2_kiosk)


@pytest.mark.parametrize("cpu", list(ARM_CPUS))
def test_a_bundle_made_here_passes_its_self_test_and_scans_alike_on_an_arm_kiosk(
        trained_demo: TrainedDemo, arm: ArmKiosk, cpu: str, tmp_path: Path) -> None:
    """A Jetson without TensorRT (or any Arm kiosk) runs the bundle on ONNX Runtime's Arm
    INT8 kernels: each kind (NEON, dot product, int8 matrix multiply) must accept the bundle
    and name the products this machine names. Half the scans: qemu runs a scan in 0.3-0.6 s."""
    assert check_kiosk(trained_demo, tmp_path, arm.env, arm.python(cpu), per_product=4
                       ) == "aarch64"
