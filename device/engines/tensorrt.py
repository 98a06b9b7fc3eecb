"""TensorRT on an NVIDIA GPU (a Jetson, or a workstation): builds an engine from the bundle's
ONNX on first start, keeps it in a cache, and runs it with the TensorRT 10 tensor-address API.

INT8 is explicit quantisation: the bundle's INT8 QDQ model, rewritten into the form TensorRT
parses (`tensorrt_qdq`), built with the INT8 and FP16 flags (TensorRT 10 weak typing: layers
without Q/DQ, the heads, may run in FP16). FP16 and FP32 build from the bundle's FP32 model. A
bundle exported with `storyscan export --tensorrt torch2trt` may carry a ready INT8 engine; it
is used when it was built by this TensorRT version on this GPU model.

An engine is cached under a key of TensorRT version, GPU (name, compute capability, SM count),
bundle hash, precision and batch limit (`engine_key`): an upgrade of any of them builds a new
engine instead of loading a stale one, and an engine that no longer deserialises is rebuilt.
Files are written atomically; a timing cache per TensorRT version and GPU makes rebuilds
faster; build phases are logged ('storyscan.tensorrt'). GPU memory comes from pycuda (pagelocked
host buffers, device allocations, a stream), or from torch when pycuda is not installed.

Nothing here imports tensorrt, pycuda or torch until an engine is opened: the key, the QDQ
rewrite and the availability check run, and are tested, on any machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device.engines import EngineError
from models.bundle import OUTPUTS, Bundle

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("storyscan.tensorrt")

PRECISIONS = ("int8", "fp16", "fp32")
MAX_BATCH = 32  # the optimisation profile's largest batch; bigger batches run in parts
WORKSPACE_BYTES = 1 << 30
RECIPE = 1  # how engines are built here; a change of recipe must not reuse older engines
INPUT = "image"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


def _first_line(e: BaseException | str) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return line or (type(e).__name__ if isinstance(e, BaseException) else "")


# --- keys and files (pure) ---------------------------------------------------------------------


def engine_key(trt_version: str, gpu: str, bundle_digest: str, precision: str,
               max_batch: int = MAX_BATCH, recipe: int = RECIPE) -> str:
    """The cache name of an engine: readable parts, then a hash of them all exactly (two GPU
    names that read the same after cleaning still get different keys)."""
    parts = (trt_version, gpu, bundle_digest, precision, str(max_batch), str(recipe))
    exact = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
    readable = (f"trt{trt_version}", gpu, bundle_digest[:12], precision, f"b{max_batch}")
    return "-".join(_slug(p) for p in readable) + f"-{exact}"


def timing_cache_name(trt_version: str, gpu: str) -> str:
    """Tactic timings depend on the TensorRT version and the GPU, not on the model."""
    return f"timing-trt{_slug(trt_version)}-{_slug(gpu)}.cache"


def bundled_engine_name(trt_version: str, gpu: str) -> str:
    """The file name a torch2trt engine gets in a bundle (a plain name: bundles refuse paths)."""
    return f"model_int8_torch2trt-trt{_slug(trt_version)}-{_slug(gpu)}.engine"


def default_cache_dir() -> Path:
    """$STORYSCAN_ENGINE_CACHE, else $XDG_CACHE_HOME/storyscan/engines (~/.cache/...)."""
    if os.environ.get("STORYSCAN_ENGINE_CACHE"):
        return Path(os.environ["STORYSCAN_ENGINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "storyscan" / "engines"


def write_atomic(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Written beside `path`, fsynced, then renamed over it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- what this machine has ---------------------------------------------------------------------

_CU_ATTRIBUTE_SM_COUNT, _CU_ATTRIBUTE_CC_MAJOR, _CU_ATTRIBUTE_CC_MINOR = 16, 75, 76


@functools.cache
def gpu_identity() -> str | None:
    """The first CUDA GPU as an engine depends on it, e.g. 'Orin sm_87 8SM', through the CUDA
    driver itself (no pycuda or torch needed); None without a driver or a GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, dev = ctypes.c_int(0), ctypes.c_int(0)
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0
            or count.value < 1 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0):
        return None
    name = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGetName(name, len(name), dev) != 0:
        return None
    values = []
    for attribute in (_CU_ATTRIBUTE_CC_MAJOR, _CU_ATTRIBUTE_CC_MINOR, _CU_ATTRIBUTE_SM_COUNT):
        value = ctypes.c_int(0)
        cuda.cuDeviceGetAttribute(ctypes.byref(value), attribute, dev)
        values.append(value.value)
    major, minor, sms = values
    return f"{name.value.decode(errors='replace').strip()} sm_{major}{minor} {sms}SM"


def unavailable() -> str | None:
    """Why the TensorRT engine cannot run on this machine, in a few words; None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT not installed (Jetson/GPU only: JetPack's python3, or "
                "pip install 'storyscan[jetson]')")
    try:
        importlib.import_module("tensorrt")
    except Exception as e:  # a broken install raises anything from OSError to RuntimeError
        return f"tensorrt does not import ({_first_line(e)})"
    if gpu_identity() is None:
        return "no CUDA GPU found (the CUDA driver sees no device)"
    if importlib.util.find_spec("pycuda") is None and importlib.util.find_spec("torch") is None:
        return "GPU memory needs pycuda (pip install pycuda) or torch with CUDA"
    return None


# --- the INT8 model in TensorRT's form (pure ONNX) ---------------------------------------------

_QRANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _axis(node: onnx.NodeProto, ndim: int) -> int:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return axis % max(ndim, 1)


def _per_axis(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if values.size <= 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def tensorrt_qdq(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Rewrite ONNX Runtime's QDQ model into the explicit quantisation TensorRT builds; returns
    how many tensors of each kind were changed.

    TensorRT takes only symmetric signed INT8 (zero point 0) and Q/DQ on activations or on float
    weights. The bundle's model has uint8 activations with zero points, int8 weights stored
    quantised, and int32 biases behind a DequantizeLinear. So:
    - an activation's uint8 range [s(0 - z), s(255 - z)] becomes a symmetric int8 one with the
      same reach, scale max(|lo|, |hi|) / 127, behind a Clip to the old range: ONNX Runtime
      drops a ReLU/ReLU6 whose output range the quantisation already clamps, and the clamp must
      survive the wider symmetric range (one bit of resolution is given up on one-sided
      activations, as with symmetric calibration);
    - stored int8 weights become their float values followed by Q/DQ with the same scales (an
      exact round trip);
    - an int32 bias becomes its float value.
    """
    import onnx  # here, not at import: the kiosk's 'auto' check stays light
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    added: list[onnx.TensorProto] = []
    changed = {"activations": 0, "weights": 0, "biases": 0}
    requantised: dict[str, tuple[str, str]] = {}  # Q output -> its new (scale, zero point)
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, value: np.ndarray) -> str:
        added.append(numpy_helper.from_array(value, name))
        return name

    for node in graph.node:
        op = node.op_type
        if op == "DequantizeLinear" and node.input[0] in inits:  # stored weights or a bias
            q = numpy_helper.to_array(inits[node.input[0]])
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zp = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                  if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
            axis = _axis(node, q.ndim)
            value = ((q.astype(np.float64) - _per_axis(zp, q.ndim, axis))
                     * _per_axis(scale, q.ndim, axis)).astype(np.float32)
            out = node.output[0]
            if q.dtype not in _QRANGE:  # int32 bias: just its float value
                constant(out, value)
                changed["biases"] += 1
                continue
            if q.dtype != np.int8 or zp.any():  # not symmetric int8: new symmetric scales
                if scale.size > 1:
                    amax = np.abs(value).max(axis=tuple(i for i in range(q.ndim) if i != axis))
                else:
                    amax = np.abs(value).max(initial=0.0)
                scale = np.where(amax > 0, amax / 127, 1.0)
            per_axis = scale.size > 1
            s = constant(f"{out}_trt_scale", scale.astype(np.float32).reshape(-1 if per_axis
                                                                               else ()))
            z = constant(f"{out}_trt_zero_point", np.zeros(scale.size if per_axis else (),
                                                           np.int8))
            w = constant(f"{out}_trt_float", value)
            kw = {"axis": axis} if per_axis else {}
            nodes += [helper.make_node("QuantizeLinear", [w, s, z], [f"{out}_trt_q"],
                                       name=f"{node.name}_trt_q", **kw),
                      helper.make_node("DequantizeLinear", [f"{out}_trt_q", s, z], [out],
                                       name=f"{node.name}_trt_dq", **kw)]
            changed["weights"] += 1
            continue
        if op == "QuantizeLinear" and node.input[0] not in inits:  # an activation
            scale = numpy_helper.to_array(inits[node.input[1]])
            zp = (numpy_helper.to_array(inits[node.input[2]])
                  if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8))
            if zp.dtype == np.int8 and not zp.any():
                nodes.append(node)  # already TensorRT's form
                continue
            if zp.dtype not in _QRANGE or scale.size != 1:
                raise EngineError(f"{src}: quantisation of {node.input[0]!r} ({zp.dtype}, "
                                  f"{scale.size} scales) has no TensorRT form")
            qmin, qmax = _QRANGE[zp.dtype]
            s, z = float(scale.reshape(())), float(zp.reshape(()))
            lo, hi = s * (qmin - z), s * (qmax - z)
            new_scale = np.float32(max(-lo, hi) / 127)
            x = node.input[0]
            if abs(lo + hi) > s:  # an asymmetric range clamps more than its symmetric cover
                low = constant(f"{node.name}_trt_min", np.array(lo, np.float32))
                high = constant(f"{node.name}_trt_max", np.array(hi, np.float32))
                nodes.append(helper.make_node("Clip", [x, low, high], [f"{x}_trt_clipped"],
                                              name=f"{node.name}_trt_clip"))
                x = f"{x}_trt_clipped"
            s_name = constant(f"{node.name}_trt_scale", np.array(new_scale, np.float32))
            z_name = constant(f"{node.name}_trt_zero_point", np.array(0, np.int8))
            nodes.append(helper.make_node("QuantizeLinear", [x, s_name, z_name],
                                          list(node.output), name=node.name))
            requantised[node.output[0]] = (s_name, z_name)
            changed["activations"] += 1
            continue
        if op == "DequantizeLinear" and node.input[0] in requantised:
            s_name, z_name = requantised[node.input[0]]
            nodes.append(helper.make_node("DequantizeLinear", [node.input[0], s_name, z_name],
                                          list(node.output), name=node.name))
            continue
        nodes.append(node)

    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # types of rewritten tensors changed; TensorRT infers them again
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return changed


# --- GPU memory --------------------------------------------------------------------------------


class _PycudaMemory:
    """Pagelocked host buffers, device allocations and a stream in the GPU's primary context
    (the one TensorRT's CUDA runtime uses), made current only while in use."""

    def __init__(self) -> None:
        import pycuda.driver as cuda

        self.cuda = cuda
        cuda.init()
        self.context = cuda.Device(0).retain_primary_context()
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}
        with self.active():
            self.stream = cuda.Stream()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def allocate(self, name: str, size: int, dtype: np.dtype) -> None:
        self.host[name] = self.cuda.pagelocked_empty(max(size, 1), dtype)
        self.device[name] = self.cuda.mem_alloc(self.host[name].nbytes)

    def pointer(self, name: str) -> int:
        return int(self.device[name])

    @property
    def stream_handle(self) -> int:
        return self.stream.handle

    def upload(self, name: str, array: np.ndarray) -> None:
        part = self.host[name][: array.size]
        part[:] = array.ravel()
        self.cuda.memcpy_htod_async(self.device[name], part, self.stream)

    def download(self, name: str, size: int) -> None:
        self.cuda.memcpy_dtoh_async(self.host[name][:size], self.device[name], self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class _TorchMemory:
    """The same through torch's CUDA tensors (pinned host tensors, a torch stream)."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EngineError("the TensorRT engine needs pycuda (pip install pycuda) or torch "
                              "with CUDA; this torch has no CUDA device")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.device: dict[str, Any] = {}
        self.pinned: dict[str, Any] = {}
        self.host: dict[str, np.ndarray] = {}

    def active(self) -> contextlib.AbstractContextManager:
        return self.torch.cuda.stream(self.stream)

    def allocate(self, name: str, size: int, dtype: np.dtype) -> None:
        kind = self.torch.from_numpy(np.empty(0, dtype)).dtype
        self.device[name] = self.torch.empty(max(size, 1), dtype=kind, device="cuda")
        self.pinned[name] = self.torch.empty(max(size, 1), dtype=kind, pin_memory=True)
        self.host[name] = self.pinned[name].numpy()

    def pointer(self, name: str) -> int:
        return self.device[name].data_ptr()

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def upload(self, name: str, array: np.ndarray) -> None:
        self.host[name][: array.size] = array.ravel()
        self.device[name][: array.size].copy_(self.pinned[name][: array.size], non_blocking=True)

    def download(self, name: str, size: int) -> None:
        self.pinned[name][:size].copy_(self.device[name][:size], non_blocking=True)

    def synchronize(self) -> None:
        self.stream.synchronize()


def _open_memory() -> _PycudaMemory | _TorchMemory:
    if importlib.util.find_spec("pycuda") is not None:
        try:
            return _PycudaMemory()
        except Exception as e:  # pycuda raises its own driver errors
            raise EngineError(f"pycuda cannot open the GPU ({_first_line(e)})") from None
    if importlib.util.find_spec("torch") is not None:
        return _TorchMemory()
    raise EngineError("the TensorRT engine needs pycuda (pip install pycuda) or torch with CUDA "
                      "for GPU memory")


# --- building ----------------------------------------------------------------------------------


def _console_log() -> None:
    """Build progress must reach the console even when nothing configured logging (a build
    takes minutes on a Jetson)."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("storyscan: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # a root handler configured later would print it twice


def _progress_monitor(trt: Any) -> Any:
    """An IProgressMonitor (TensorRT >= 10) logging the builder's top phases and, every ten
    seconds at most, a top phase's steps; None where TensorRT has no such interface."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class BuildProgress(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.lock = threading.Lock()
            self.phases: dict[str, list] = {}  # name -> [depth, steps, started, last logged]

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int
                        ) -> None:
            with contextlib.suppress(Exception), self.lock:
                parent = self.phases.get(parent_phase) if parent_phase else None
                depth = parent[0] + 1 if parent else 0
                now = time.monotonic()
                self.phases[phase_name] = [depth, num_steps, now, now]
                if depth <= 1:
                    log.info("%s%s (%d steps)", "  " * depth, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with contextlib.suppress(Exception), self.lock:
                phase = self.phases.get(phase_name)
                now = time.monotonic()
                if phase and phase[0] == 0 and now - phase[3] >= 10:
                    phase[3] = now
                    log.info("%s: step %d of %d", phase_name, step + 1, phase[1])
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with contextlib.suppress(Exception), self.lock:
                phase = self.phases.pop(phase_name, None)
                if phase and phase[0] <= 1:
                    log.info("%s%s done in %.1f s", "  " * phase[0], phase_name,
                             time.monotonic() - phase[2])

    return BuildProgress()


@functools.cache
def _trt_logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)  # one per process, as TensorRT asks


def _import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise EngineError(f"TensorRT engine unavailable: {unavailable()}") from None
    except Exception as e:
        raise EngineError(f"tensorrt does not import ({_first_line(e)})") from None


class TrtEngine:
    """A bundle's network as a TensorRT engine; `source` says where the engine came from:
    'bundle' (a torch2trt engine the bundle carries), 'cache' or 'built'."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "int8",
                 cache_dir: str | Path | None = None, max_batch: int = MAX_BATCH) -> None:
        if precision not in PRECISIONS:
            raise EngineError(f"the TensorRT engine runs {', '.join(PRECISIONS)}, not "
                              f"{precision!r}")
        if max_batch < 1:
            raise EngineError(f"max_batch {max_batch}: must be at least 1")
        self.precision = precision
        self.trt = trt = _import_tensorrt()
        gpu = gpu_identity()
        if gpu is None:
            raise EngineError("TensorRT engine unavailable: no CUDA GPU found")
        self.gpu, self.bundle_key = gpu, bundle.key
        self.logger = _trt_logger(trt)
        self.memory = _open_memory()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.key = engine_key(trt.__version__, gpu, bundle.digest, precision, max_batch)
        self.path = self.cache_dir / f"{self.key}.engine"
        self.timing_path = self.cache_dir / timing_cache_name(trt.__version__, gpu)
        _console_log()
        with self.memory.active():
            self.runtime = trt.Runtime(self.logger)
            self.engine, self.source = self._load(bundle, max_batch)
            self._bind()

    # -- where the engine comes from --

    def _deserialize(self, data: bytes, what: str) -> Any:
        try:
            engine = self.runtime.deserialize_cuda_engine(data)
        except Exception as e:  # TensorRT raises or returns None, by version
            log.warning("%s does not load (%s)", what, _first_line(e))
            return None
        if engine is None:
            log.warning("%s does not load", what)
        return engine

    def _bundled(self, bundle: Bundle) -> Path | None:
        """A torch2trt engine in the bundle built by this TensorRT on this GPU model."""
        for entry in bundle.manifest.get("tensorrt", {}).get("engines", []):
            if (entry.get("precision") == self.precision
                    and entry.get("tensorrt") == self.trt.__version__
                    and entry.get("gpu") == self.gpu):
                return bundle.path / entry["file"]
        return None

    def _load(self, bundle: Bundle, max_batch: int) -> tuple[Any, str]:
        bundled = self._bundled(bundle)
        if bundled is not None:
            engine = self._deserialize(bundled.read_bytes(), f"bundled engine {bundled.name}")
            if engine is not None:
                log.info("TensorRT engine from the bundle: %s", bundled.name)
                return engine, "bundle"
        if self.path.is_file():
            engine = self._deserialize(self.path.read_bytes(), f"cached engine {self.path}")
            if engine is not None:
                return engine, "cache"
            log.warning("rebuilding %s", self.path.name)
        started = time.monotonic()
        log.info("building the TensorRT %s engine for %s on %s (TensorRT %s): minutes on a "
                 "Jetson, once; then cached as %s", self.precision, bundle.key, self.gpu,
                 self.trt.__version__, self.path)
        with tempfile.TemporaryDirectory() as tmp:
            if self.precision == "int8":
                src = Path(tmp) / "model_int8_tensorrt.onnx"
                tensorrt_qdq(bundle.model_path("int8"), src)
            else:
                src = bundle.model_path("fp32")
            data = self._build(src, max_batch)
        try:
            write_atomic(self.path, data)
        except OSError as e:
            log.warning("cannot cache the engine in %s (%s): it is rebuilt next start",
                        self.cache_dir, e.strerror or e)
        log.info("engine built in %.0f s", time.monotonic() - started)
        engine = self._deserialize(data, "the engine just built")
        if engine is None:
            raise EngineError("TensorRT built an engine it cannot load (see its log above)")
        return engine, "built"

    def _build(self, onnx_path: Path, max_batch: int) -> bytes:
        trt = self.trt
        weak = hasattr(trt.BuilderFlag, "INT8")  # TensorRT 11 builds strongly typed only
        if self.precision == "fp16" and not weak:
            raise EngineError(f"fp16 needs TensorRT 10 (TensorRT {trt.__version__} builds only "
                              "strongly typed networks): use --precision int8 or fp32")
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch: the only kind in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(f"{onnx_path.name}: TensorRT cannot parse it "
                              f"({_first_line(errors[0]) if errors else 'no reason given'})")
        image = network.get_input(0)
        dims = tuple(image.shape)[1:]
        if network.num_inputs != 1 or image.name != INPUT or min(dims, default=0) < 1:
            raise EngineError(f"{onnx_path.name}: expected one input 'image' [batch, 3, H, W], "
                              f"found {image.name!r} {tuple(image.shape)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.precision == "int8" and weak:  # Q/DQ layers run INT8; the rest may use FP16
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT, (1, *dims), (1, *dims), (max_batch, *dims))
        config.add_optimization_profile(profile)
        self._use_timing_cache(config)
        monitor = _progress_monitor(trt)  # referenced until the build ends, as TensorRT needs
        if monitor is not None:
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT could not build the {self.precision} engine (its log "
                              "above says why)")
        self._save_timing_cache(config)
        return bytes(serialized)

    def _use_timing_cache(self, config: Any) -> None:
        data = b""
        with contextlib.suppress(OSError):
            data = self.timing_path.read_bytes()
        cache = None
        with contextlib.suppress(Exception):
            cache = config.create_timing_cache(data)
        if cache is None:  # an unreadable cache file: start a new one
            log.warning("timing cache %s is unreadable; starting a new one", self.timing_path)
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    def _save_timing_cache(self, config: Any) -> None:
        try:
            write_atomic(self.timing_path, bytes(config.get_timing_cache().serialize()))
        except OSError as e:
            log.warning("cannot save the timing cache %s (%s)", self.timing_path,
                        e.strerror or e)

    # -- running --

    def _bind(self) -> None:
        trt, engine = self.trt, self.engine
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT]:
            raise EngineError(f"the TensorRT engine's inputs are {inputs}, expected ['image']")
        self.outputs = [n for n in self.names if n != INPUT]
        missing = [n for n in OUTPUTS if n not in self.outputs]
        if missing:
            raise EngineError(f"the TensorRT engine lacks the output(s) {', '.join(missing)}")
        largest = tuple(engine.get_tensor_profile_shape(INPUT, 0)[2])
        self.input_shape, self.max_batch = largest, largest[0]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT)))
        self.context = engine.create_execution_context()
        self.context.set_input_shape(INPUT, largest)
        self.output_shapes = {}
        for name in self.names:
            shape = largest if name == INPUT else tuple(self.context.get_tensor_shape(name))
            if name != INPUT:
                self.output_shapes[name] = shape
            self.memory.allocate(name, int(np.prod(shape)),
                                 np.dtype(trt.nptype(engine.get_tensor_dtype(name))))

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if x.ndim != 4 or x.shape[1:] != self.input_shape[1:]:
            raise EngineError(f"input of shape {x.shape}; this engine takes [N, "
                              f"{', '.join(map(str, self.input_shape[1:]))}]")
        if not len(x):
            return {n: np.zeros((0, *s[1:]), np.float32) for n, s in self.output_shapes.items()}
        parts = [self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts]) for n in self.outputs}

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self.memory.active():
            context = self.context
            if not context.set_input_shape(INPUT, x.shape):
                raise EngineError(f"the TensorRT engine refuses an input of shape {x.shape}")
            self.memory.upload(INPUT, x)
            for name in self.names:
                context.set_tensor_address(name, self.memory.pointer(name))
            if not context.execute_async_v3(self.memory.stream_handle):
                raise EngineError("TensorRT failed to run the engine (see its log above)")
            shapes = {n: tuple(context.get_tensor_shape(n)) for n in self.outputs}
            for name, shape in shapes.items():
                self.memory.download(name, int(np.prod(shape)))
            self.memory.synchronize()
            return {n: self.memory.host[n][: int(np.prod(s))].reshape(s).copy()
                    for n, s in shapes.items()}
