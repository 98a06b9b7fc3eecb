"""One INT8 bundle on this CPU and on other kiosk CPUs (emulated): the same answers?

    python bench/kiosk_cpus.py --bundle bundles/grocery-1 --data ../shared/data/grocery

A bundle is exported, measured and given its golden self-test outputs on the workstation,
whose CPU may have VNNI or AMX. A kiosk with AVX2 alone runs ONNX Runtime's other x86 INT8
kernels (uint8 x int8 pairs summed in int16, which can saturate); an Arm kiosk (a Jetson
without TensorRT) runs the Arm ones: NEON, dot-product or int8 matrix-multiply instructions by
CPU generation. Each CPU runs in its own process over the val photos: the AVX2 one sees a
CPUID without AVX-512, VNNI and AMX, so its libraries take their AVX2 paths on this machine's
cores; each Arm one is an aarch64 Python under qemu as that CPU (bench/emulated_cpu.py). The
table gives INT8 top-1, agreement with FP32 (on this CPU) and with this CPU's INT8 answers,
the golden self-test's lowest cosine (the kiosk refuses a bundle below its `min_cosine`) and
the time of one photo at a time where the code runs on this machine's cores (the AVX2 code
here, not an older CPU's speed; qemu's times are emulation's, so none are given).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.emulated_cpu import ARM_CPUS, EmulationUnavailable, arm_kiosk, avx2_only_env
from bench.report import add_docs_args, cpu_model, write_docs
from device.engines import infer_all, open_engine
from device.updates import ReleaseRefused, self_test
from models.bundle import load_bundle
from models.preprocess import InputSpec, prepare
from models.tables import format_markdown_table, format_table
from trainer.ingest import IngestReport, load_split, read_layout

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
TIMED = 40  # photos timed one at a time
COLUMNS = ["kiosk CPU", "fine top-1", "coarse top-1", "INT8/FP32 agree",
           "same product as this CPU", "golden min cosine", "self-test", "ms / photo"]


def val_photos(spec: InputSpec, data: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The val photos prepared as `spec` says (on the calling process's CPU), and their fine
    and coarse labels."""
    val = load_split(read_layout(data)[2], lambda img: prepare(img, spec), IngestReport(), {},
                     "validation photos")
    return val.images, np.array(val.fine), np.array(val.coarse)


def measure(bundle_dir: Path, data: Path, out: Path, timed: int) -> None:
    """The worker: this process's CPU's INT8 outputs, golden cosine and the time of `timed`
    photos one at a time, to `out`."""
    bundle = load_bundle(bundle_dir)
    images, _, _ = val_photos(bundle.input_spec, data)
    engine = open_engine(bundle, "auto", "int8")
    scores = infer_all(engine, images)
    golden = bundle.manifest["golden"]
    expected = np.load(bundle.path / golden["outputs"]["embedding"])
    got = engine.infer(np.load(bundle.path / golden["inputs"]).astype(np.float32))["embedding"]
    cosine = np.sum(got * expected, 1) / (np.linalg.norm(got, axis=1)
                                         * np.linalg.norm(expected, axis=1))
    try:
        verdict = self_test(bundle)
    except ReleaseRefused as e:
        verdict = str(e)
    times = []
    for x in images[:timed]:
        t0 = time.perf_counter()
        engine.infer(x[None])
        times.append(time.perf_counter() - t0)
    np.savez(out, fine=scores["fine"], coarse=scores["coarse"], golden=cosine.min(),
             verdict=verdict, ms=np.median(times) * 1e3 if times else np.nan)


@dataclass
class KioskCpu:
    """How to start a worker process as one kiosk CPU."""

    python: list[str] = field(default_factory=lambda: [sys.executable])
    env: dict[str, str] = field(default_factory=dict)
    native: bool = True  # runs on this machine's cores (False: emulated, so not timed)


def kiosk_cpus(build: Path, arm: list[str]) -> tuple[dict[str, KioskCpu], list[str]]:
    """This CPU, the AVX2-only one and the Arm CPUs `arm` (qemu models, see ARM_CPUS) this
    machine can play, by name, and why it cannot play the others."""
    cpus, missing = {f"this CPU: {cpu_model()}": KioskCpu()}, []
    try:
        cpus["AVX2 only (emulated)"] = KioskCpu(env=avx2_only_env(build))
    except EmulationUnavailable as e:
        missing.append(f"AVX2 only: {e}")
    if arm:
        try:
            kiosk = arm_kiosk()
            cpus.update({f"Arm {ARM_CPUS[cpu]} (qemu)": KioskCpu(kiosk.python(cpu),
                                                                   kiosk.env, False)
                         for cpu in arm})
        except EmulationUnavailable as e:
            missing.append(f"Arm: {e}")
    return cpus, missing


def run_worker(bundle: Path, data: Path, out: Path, cpu: KioskCpu) -> dict:
    subprocess.run([*cpu.python, __file__, "--bundle", str(bundle), "--data", str(data),
                    "--worker", str(out), "--timed", str(TIMED if cpu.native else 0)],
                   check=True, env={**os.environ, **cpu.env})
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--arm-cpus", default=",".join(ARM_CPUS),
                   help="comma-separated Arm CPUs to emulate (qemu models; '' for none): an "
                        "Arm CPU runs the val photos in about 15 minutes on 2 cores")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--timed", type=int, default=TIMED, help=argparse.SUPPRESS)
    add_docs_args(p)
    args = p.parse_args()
    if args.worker:
        return measure(args.bundle, args.data, args.worker, args.timed)
    arm = [c for c in args.arm_cpus.split(",") if c]
    if unknown := set(arm) - set(ARM_CPUS):
        p.error(f"unknown Arm CPUs {sorted(unknown)}; choose from {', '.join(ARM_CPUS)}")
    bundle = load_bundle(args.bundle)
    images, fine, coarse = val_photos(bundle.input_spec, args.data)
    fp32 = infer_all(open_engine(bundle, "auto", "fp32"), images)["fine"].argmax(1)
    with tempfile.TemporaryDirectory() as tmp:
        cpus, missing = kiosk_cpus(Path(tmp) / "avx2", arm)
        results = {name: run_worker(args.bundle, args.data, Path(tmp) / f"{i}.npz", cpu)
                   for i, (name, cpu) in enumerate(tqdm(cpus.items(), "kiosk CPUs"))}
    here = next(iter(results.values()))["fine"].argmax(1)
    rows = []
    for name, r in results.items():
        pick = r["fine"].argmax(1)
        rows.append({"kiosk CPU": name, "fine top-1": np.mean(pick == fine),
                     "coarse top-1": np.mean(r["coarse"].argmax(1) == coarse),
                     "INT8/FP32 agree": np.mean(pick == fp32),
                     "same product as this CPU": np.mean(pick == here),
                     "golden min cosine": float(r["golden"]), "self-test": str(r["verdict"]),
                     "ms / photo": None if np.isnan(r["ms"]) else float(r["ms"])})
    print(format_table(rows, COLUMNS))
    for reason in missing:
        print(f"not emulated: {reason}")
    if not args.no_docs:
        q = bundle.manifest["quantization"]
        body = (f"Bundle `{bundle.key}` ({args.bundle}: {bundle.manifest['architecture']}, "
                f"{q['weights']} weights, kept in FP32: {q['fp32_layers']}), "
                f"{len(images)} val photos; the golden self-test refuses below cosine "
                f"{bundle.manifest['golden'].get('min_cosine')}. Arm CPUs run in an "
                "aarch64 Python under user-mode qemu, instruction by instruction, so they have "
                "no times."
                f"\n\n{format_markdown_table(rows, COLUMNS)}"
                + "".join(f"\n\nNot emulated on this machine: {m}." for m in missing))
        write_docs(args, "kiosk-cpus", "Kiosk CPUs: one INT8 bundle on other kiosk CPUs", body)


if __name__ == "__main__":
    main()
