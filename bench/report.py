"""Writing benchmark results into docs/BENCHMARKS.md, one section per benchmark.

Each benchmark owns the section between `<!-- NAME:start -->` and `<!-- NAME:end -->`, and
rewrites it with its table, the exact command, the machine and the date, leaving the other
benchmarks' sections as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shlex
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEvery number here is written by a script in `bench/`; rerun its "
          "command to check it.\n")


# x86 instruction sets that change INT8 and bf16 results or speed, best first: without VNNI
# ONNX Runtime's INT8 kernels sum in int16 (see trainer/quantize.py QuantOptions.reduce_range)
SIMD = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
        ("avx512f", "AVX-512, no VNNI"), ("avx2", "AVX2, no VNNI"))


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU's feature flags in /proc/cpuinfo's text `cpuinfo`."""
    return set(next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
                     if ln.startswith("flags")), []))


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name, and on x86 its best INT8 instruction set and whether it has bf16, since
    machines of the same name here differ in them (`cpuinfo`: /proc/cpuinfo's text)."""
    fallback = platform.processor() or platform.machine()
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), fallback)
    flags = cpu_flags(text)
    simd = next((label for flag, label in SIMD if flag in flags), None)
    if simd is None:
        return name
    return f"{name} ({simd}{', bf16' if 'avx512_bf16' in flags or 'amx_bf16' in flags else ''})"


def gpu() -> str | None:
    """The CUDA device torch would train on, if torch is installed and sees one."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine() -> str:
    packages = []
    for name in ("torch", "onnxruntime", "opencv-python-headless", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            packages.append(f"{name} {version(name)}")
    accelerator = f", GPU {gpu()}" if gpu() else ""
    return (f"{cpu_model()}, {os.cpu_count()} cores{accelerator}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}; " + ", ".join(packages))


def command() -> str:
    return "python " + shlex.join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def add_docs_args(p: argparse.ArgumentParser) -> None:
    """`--section` and `--no-docs`, the same on every benchmark."""
    p.add_argument("--section", help="docs/BENCHMARKS.md section to write (default: the "
                   "benchmark's own); another name keeps this run beside the last, named in "
                   "its title")
    p.add_argument("--no-docs", action="store_true",
                   help="print the tables only; docs/BENCHMARKS.md stays as it is")


def write_docs(args: argparse.Namespace, own: str, title: str, body: str) -> None:
    """Write `body` as the benchmark's section `own`, or as the one `--section` names (then
    named in the title too, so two runs side by side tell apart); nothing with --no-docs."""
    if args.no_docs:
        return
    name = args.section or own
    if name != own:
        title = f"{title} ({name})"
    print(f"written to {write_section(name, title, body)}")


def write_section(name: str, title: str, body: str) -> Path:
    """Replace (or append) this benchmark's section of docs/BENCHMARKS.md."""
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    section = (f"<!-- {name}:start -->\n## {title}\n\n"
               f"Command: `{command()}`  \nMachine: {machine()}  \nDate: {today}\n\n"
               f"{body.strip()}\n<!-- {name}:end -->")
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->",
                         re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) \
        else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    return DOC
