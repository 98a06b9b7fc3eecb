"""Run a command as on an AVX2-only x86 kiosk (no AVX-512, VNNI or AMX) on a newer CPU.

ONNX Runtime picks its INT8 kernels by CPUID when it loads: with VNNI or AMX they sum uint8 x
int8 products exactly in int32, on AVX2 alone they sum pairs in int16, which can saturate. So
an INT8 bundle exported and measured on a workstation can compute differently on a kiosk with
an older CPU. `avx2_only.c`, preloaded into a process, answers that process's CPUID with those
features cleared (Linux's CPUID faulting), so its libraries take their AVX2 paths for real.

    env = avx2_only_env(Path("/tmp/build"))  # raises EmulationUnavailable with the reason
    subprocess.run([...], env={**os.environ, **env})
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from bench.report import cpu_flags, read_cpuinfo

SOURCE = Path(__file__).with_name("avx2_only.c")
# what the emulated CPU lacks: without any of these ONNX Runtime's INT8 kernels are AVX2's
NEWER = ("avx512_vnni", "avx_vnni", "amx_int8")


class EmulationUnavailable(RuntimeError):
    """This machine cannot play an AVX2-only CPU (or already is one); the message says why."""


def avx2_only_env(build: Path) -> dict[str, str]:
    """Environment variables that make a new process see an AVX2-only CPU; the preload
    library is compiled into `build` with the system's C compiler."""
    flags = cpu_flags(read_cpuinfo())
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise EmulationUnavailable(f"needs Linux on x86_64, not {platform.system()} "
                                   f"{platform.machine()}")
    if "cpuid_fault" not in flags:
        raise EmulationUnavailable("this CPU or hypervisor has no CPUID faulting")
    if "avx2" not in flags or not flags & set(NEWER):
        raise EmulationUnavailable("this CPU has no VNNI or AMX: its INT8 kernels already "
                                   "are an AVX2 kiosk's")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise EmulationUnavailable("no C compiler (cc) to build the CPUID preload library")
    library = build / "avx2_only.so"
    if not library.is_file():
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(library), str(SOURCE)],
                       check=True, capture_output=True)
    # faulthandler would take SIGSEGV, which every CPUID now raises, from the preload library
    return {"LD_PRELOAD": str(library), "PYTHONFAULTHANDLER": ""}
