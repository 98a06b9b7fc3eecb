"""Run a command as on another kiosk CPU: an AVX2-only x86 one, or an Arm one (a Jetson's).

ONNX Runtime picks its INT8 kernels by CPUID when it loads: with VNNI or AMX they sum uint8 x
int8 products exactly in int32, on AVX2 alone they sum pairs in int16, which can saturate. So
an INT8 bundle exported and measured on a workstation can compute differently on a kiosk with
an older CPU. `avx2_only.c`, preloaded into a process, answers that process's CPUID with those
features cleared (Linux's CPUID faulting), so its libraries take their AVX2 paths for real.

    env = avx2_only_env(Path("/tmp/build"))  # raises EmulationUnavailable with the reason
    subprocess.run([...], env={**os.environ, **env})

A Jetson without TensorRT, or any Arm kiosk, runs ONNX Runtime's Arm kernels: plain NEON on
Armv8.0 (Jetson Nano, TX2), dot-product instructions on Armv8.2 (Jetson Orin's Cortex-A78AE),
int8 matrix multiplies on Armv9. `arm_kiosk()` fetches an Arm Python with the kiosk's packages
and a user-mode qemu that runs it as one of those CPUs, instruction by instruction (so at
emulation speed, not the CPU's):

    kiosk = arm_kiosk()  # downloads about 100 MB once, into ~/.cache/storyscan/arm-kiosk
    subprocess.run([*kiosk.python("neoverse-n1"), "-c", "..."], env={**os.environ, **kiosk.env})
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
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
    if "avx2" not in flags or not flags & set(NEWER):
        raise EmulationUnavailable("this CPU has no VNNI or AMX: its INT8 kernels already "
                                   "are an AVX2 kiosk's")
    if "cpuid_fault" not in flags:
        raise EmulationUnavailable("this CPU or hypervisor has no CPUID faulting")
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


ROOT = Path(__file__).resolve().parents[1]
ARM_CACHE = Path.home() / ".cache" / "storyscan" / "arm-kiosk"
# qemu's CPU model -> the kiosk CPUs whose ONNX Runtime INT8 kernels it selects
ARM_CPUS = {
    "cortex-a57": "Cortex-A57: Armv8.0 NEON (Jetson Nano, TX2)",
    "neoverse-n1": "Neoverse-N1: Armv8.2 + dot product (as Jetson Orin's Cortex-A78AE)",
    "neoverse-n2": "Neoverse-N2: Armv9 + int8 matrix multiply (Jetson Thor class)",
}
# Debian's Arm Python 3.11 and the libraries its standard modules link
ARM_PYTHON = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
              "libgcc-s1", "libstdc++6", "libexpat1", "zlib1g", "libffi8", "libssl3",
              "libsqlite3-0", "liblzma5", "libbz2-1.0", "libuuid1", "libcrypt1", "libtinfo6",
              "libncursesw6", "libreadline8", "libnsl2", "libtirpc3", "libdb5.3")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass(frozen=True)
class ArmKiosk:
    """An Arm (aarch64) Python 3.11 with the kiosk's packages, run by a user-mode qemu."""

    qemu: Path
    root: Path  # the Arm system files: loader, libc, Python
    site: Path  # the kiosk's Python packages, built for aarch64

    def python(self, cpu: str) -> list[str]:
        """The command that starts this Python on the qemu CPU model `cpu` (see ARM_CPUS)."""
        return [str(self.qemu), "-L", str(self.root), "-cpu", cpu,
                str(self.root / "usr" / "bin" / "python3.11")]

    @property
    def env(self) -> dict[str, str]:
        """Its packages, then this checkout (whose storyscan.egg-info names the commands)."""
        return {"PYTHONPATH": os.pathsep.join([str(self.site), str(ROOT)]),
                "PYTHONNOUSERSITE": "1", "PYTHONHOME": ""}


def _apt(state: Path, arch: str, suite: str) -> list[str]:
    """apt-get options for a private package index of `arch` packages from Debian `suite`
    (signatures checked against Debian's archive keyring); the system's apt is untouched."""
    lists = state / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    sources = state / "sources.list"
    sources.write_text(f"deb [arch={arch} signed-by={KEYRING}] http://deb.debian.org/debian "
                       f"{suite} main\n")
    return ["-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures={arch}",
            "-o", f"Dir::State={state}", "-o", f"Dir::State::Lists={lists}",
            "-o", f"Dir::State::status={state / 'status'}", "-o", f"Dir::Cache={state}",
            "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", "Dir::Etc::Preferences=/nonexistent",
            "-o", "Dir::Etc::PreferencesParts=/nonexistent", "-q"]


def _debian_packages(into: Path, arch: str, suite: str, packages: tuple[str, ...],
                     only: str = ".") -> None:
    """Download Debian `packages` of `arch` and unpack their files under `only` (a path in
    the package) into `into`; nothing is installed."""
    work = into.with_name(into.name + "-download")
    options = _apt(work / "apt", arch, suite)
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for command in (["update"], ["download", *packages]):
        done = subprocess.run(["apt-get", *options, *command], cwd=debs, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise EmulationUnavailable(f"apt-get {command[0]} of Debian {suite} {arch} failed: "
                                       f"{done.stderr.strip().splitlines()[-1:]}")
    into.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        files = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                               capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into), only], input=files, check=True)
    shutil.rmtree(work)


def _kiosk_requirements() -> list[str]:
    """The kiosk's packages (storyscan's requirements without extras), pinned to the versions
    installed here, so both CPUs run the same ONNX Runtime and numpy."""
    names = [r.split(";")[0] for r in metadata.requires("storyscan") or [] if "extra ==" not in r]
    names = [n.split("<")[0].split(">")[0].split("=")[0].strip() for n in names]
    return [f"{n}=={metadata.version(n)}" for n in names]


def arm_kiosk(cache: Path = ARM_CACHE) -> ArmKiosk:
    """An Arm kiosk's Python under qemu, fetched into `cache` on first use: qemu-user from
    Debian trixie (static; 7.2 in bookworm crashes loading ONNX Runtime), Python 3.11 from
    Debian bookworm arm64, and the kiosk's wheels for manylinux aarch64 from the package index."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise EmulationUnavailable(f"needs Linux on x86_64, not {platform.system()} "
                                   f"{platform.machine()}")
    missing = [t for t in ("apt-get", "dpkg-deb", "tar") if shutil.which(t) is None]
    if missing or not KEYRING.is_file():
        raise EmulationUnavailable(f"needs Debian's apt-get, dpkg-deb, tar and {KEYRING} to "
                                   "fetch qemu and an Arm Python")
    kiosk = ArmKiosk(cache / "qemu" / "usr" / "bin" / "qemu-aarch64", cache / "root",
                     cache / "site")
    requirements = _kiosk_requirements()
    stamp = cache / "requirements.txt"
    if stamp.is_file() and stamp.read_text() == "\n".join(requirements):
        return kiosk
    shutil.rmtree(cache, ignore_errors=True)
    _debian_packages(cache / "qemu", "amd64", "trixie", ("qemu-user",),
                     "./usr/bin/qemu-aarch64")
    _debian_packages(kiosk.root, "arm64", "bookworm", ARM_PYTHON)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(kiosk.site),
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--abi", "cp311", *(f"--platform={p}" for p in
                             ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
                              "manylinux2014_aarch64")), *requirements],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulationUnavailable(f"pip could not fetch the kiosk's aarch64 wheels: "
                                   f"{done.stderr.strip().splitlines()[-1:]}")
    stamp.write_text("\n".join(requirements))
    return kiosk
