"""One INT8 bundle on this CPU and on an AVX2-only kiosk CPU (emulated): same answers?

    python bench/kiosk_cpus.py --bundle bundles/grocery-1 --data ../shared/data/grocery

A bundle is exported, measured and given its golden self-test outputs on the workstation,
whose CPU may have VNNI or AMX; a kiosk with AVX2 alone runs ONNX Runtime's other INT8 kernels
(uint8 x int8 pairs summed in int16, which can saturate). Each CPU runs in its own process over
the val photos: the AVX2 one sees a CPUID without AVX-512, VNNI and AMX
(bench/emulated_cpu.py), so its libraries take their AVX2 paths on this machine's cores. The
table gives INT8 top-1, agreement with FP32 (on this CPU) and with this CPU's INT8 answers,
the golden self-test's lowest cosine (the kiosk refuses a bundle below its `min_cosine`) and
the time of one photo at a time (the AVX2 code on these cores, not an older CPU's speed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.emulated_cpu import avx2_only_env
from bench.report import cpu_model, write_section
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


def measure(bundle_dir: Path, data: Path, out: Path) -> None:
    """The worker: this process's CPU's INT8 outputs, golden cosine and timing, to `out`."""
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
    for x in images[:TIMED]:
        t0 = time.perf_counter()
        engine.infer(x[None])
        times.append(time.perf_counter() - t0)
    np.savez(out, fine=scores["fine"], coarse=scores["coarse"], golden=cosine.min(),
             verdict=verdict, ms=np.median(times) * 1e3)


def run_worker(bundle: Path, data: Path, out: Path, env: dict[str, str]) -> dict:
    subprocess.run([sys.executable, __file__, "--bundle", str(bundle), "--data", str(data),
                    "--worker", str(out)], check=True, env={**os.environ, **env})
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--section", default="kiosk-cpus", help="docs/BENCHMARKS.md section name")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args()
    if args.worker:
        return measure(args.bundle, args.data, args.worker)
    bundle = load_bundle(args.bundle)
    images, fine, coarse = val_photos(bundle.input_spec, args.data)
    fp32 = infer_all(open_engine(bundle, "auto", "fp32"), images)["fine"].argmax(1)
    with tempfile.TemporaryDirectory() as tmp:
        cpus = {f"this CPU: {cpu_model()}": {},
                "AVX2 only (emulated)": avx2_only_env(Path(tmp) / "avx2")}
        results = {name: run_worker(args.bundle, args.data, Path(tmp) / f"{i}.npz", env)
                   for i, (name, env) in enumerate(cpus.items())}
    here = next(iter(results.values()))["fine"].argmax(1)
    rows = []
    for name, r in results.items():
        pick = r["fine"].argmax(1)
        rows.append({"kiosk CPU": name, "fine top-1": np.mean(pick == fine),
                     "coarse top-1": np.mean(r["coarse"].argmax(1) == coarse),
                     "INT8/FP32 agree": np.mean(pick == fp32),
                     "same product as this CPU": np.mean(pick == here),
                     "golden min cosine": float(r["golden"]), "self-test": str(r["verdict"]),
                     "ms / photo": float(r["ms"])})
    print(format_table(rows, COLUMNS))
    if not args.no_docs:
        q = bundle.manifest["quantization"]
        body = (f"Bundle `{bundle.key}` ({args.bundle}: {bundle.manifest['architecture']}, "
                f"{q['weights']} weights, kept in FP32: {q['fp32_layers']}), "
                f"{len(images)} val photos; the golden self-test refuses below cosine "
                f"{bundle.manifest['golden'].get('min_cosine')}."
                f"\n\n{format_markdown_table(rows, COLUMNS)}")
        doc = write_section(args.section, "Kiosk CPUs: one INT8 bundle on AVX2 and on this CPU",
                            body)
        print(f"\nwrote {doc}")


if __name__ == "__main__":
    main()
