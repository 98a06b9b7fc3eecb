"""Model bundles: the one artefact that travels from trainer to kiosk.

A bundle is a directory holding `manifest.json` and the files it lists (ONNX models, class
prototypes). The manifest says everything the kiosk needs to use the model the way it was
trained: input spec, heads and labels, the similarity below which a scan is unknown (calibrated
at export; absent from older bundles), the optional multi-label attribute head (only when the
catalog had attribute labels) and the validation metrics of each precision. Loading
checks the schema and every file's size and sha256, and refuses with one `BundleError` line.
No torch here: the kiosk loads bundles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.preprocess import InputSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("int8", "fp32")
OUTPUTS = ("embedding", "fine", "coarse")  # the network's named outputs, in this order
ATTRIBUTES = "attributes"  # optional fourth output: multi-label attribute logits
# numpy parses a .npy header with ast.literal_eval, and CPython 3.11.0-3.11.7 and 3.12.0-3.12.1
# count AST recursion in one counter for all threads (gh-106905): a garbage collection in the
# middle of one parse lets another thread's parse move it, and either fails with "SystemError:
# AST constructor recursion depth mismatch". A model update's self-test loading its golden
# arrays beside another load was refused that way; loads through `load_array` take turns.
_NPY_LOCK = threading.Lock()


def load_array(path: Path) -> np.ndarray:
    """A .npy array (never pickled objects), one load at a time in this process (_NPY_LOCK)."""
    with _NPY_LOCK:
        return np.load(path, allow_pickle=False)


def logit(p: float) -> float:
    """The logit whose sigmoid is `p`: a logit above it is a probability above `p`, so heads
    that output logits need no sigmoid to be thresholded."""
    return math.log(p / (1 - p))


class BundleError(ValueError):
    """A bundle that must not be loaded; str() is one line naming the bundle and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- schema ------------------------------------------------------------------------------------

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "version": str,
    "created": str,
    "architecture": str,
    "input": dict,
    "heads": dict,
    "heads.embedding": dict,
    "heads.embedding.dim": int,
    "heads.fine": dict,
    "heads.fine.labels": list,
    "heads.fine.prototypes": str,
    "heads.fine.scale": (int, float),
    "heads.coarse": dict,
    "heads.coarse.labels": list,
    "heads.coarse.of_fine": list,
    "models": dict,
    "files": dict,
    "metrics": dict,
}
# Written by newer exports; older bundles lack them and still load (no unknown check).
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "heads.fine.unknown_threshold": (int, float),  # cosine similarity, in [-1, 1]
    "heads.fine.unknown_tar": (int, float),  # share of known val photos it accepts, in (0, 1]
    "heads.attributes": (dict,),  # only when trained with attribute labels
    "tensorrt": (dict,),  # ready TensorRT engines (`storyscan export --tensorrt torch2trt`)
    "golden": (dict,),  # self-test inputs and their expected outputs (device/updates.py)
}
# What a ready TensorRT engine's entry says: the device loads it only when its TensorRT version
# and GPU match (device/engines/tensorrt.py); the file is covered by 'files' like any other.
TENSORRT_ENGINE_FIELDS = ("file", "precision", "tensorrt", "gpu")


def _get(manifest: dict, dotted: str) -> object:
    value: object = manifest
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _attributes_problem(head: dict) -> str | None:
    """What is wrong with an attribute head: once there, all of it must be right."""
    labels, threshold = head.get("labels"), head.get("threshold")
    if head.get("output") != ATTRIBUTES:
        return f"manifest.json 'heads.attributes.output' must be {ATTRIBUTES!r}"
    if (not isinstance(labels, list) or not labels
            or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)):
        return "manifest.json 'heads.attributes.labels' must be a non-empty list of unique strings"
    if (not isinstance(threshold, int | float) or isinstance(threshold, bool)
            or not 0 < threshold < 1):
        return "manifest.json 'heads.attributes.threshold' must be a probability in (0, 1)"
    return None


def _tensorrt_problem(section: dict, files: dict) -> str | None:
    engines = section.get("engines", [])
    if not isinstance(engines, list):
        return "manifest.json 'tensorrt.engines' must be a list"
    for entry in engines:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) and entry[k]
                                                for k in TENSORRT_ENGINE_FIELDS)):
            return ("manifest.json 'tensorrt.engines' entries need "
                    f"{', '.join(repr(k) for k in TENSORRT_ENGINE_FIELDS)} as strings")
        if entry["file"] not in files:
            return (f"manifest.json refers to {entry['file']!r} but does not list it under "
                    "'files'")
    return None


def _golden_problem(section: dict, files: dict) -> str | None:
    outputs = section.get("outputs")
    if (not isinstance(section.get("inputs"), str) or not isinstance(outputs, dict)
            or not outputs or not all(isinstance(v, str) for v in outputs.values())):
        return ("manifest.json 'golden' needs 'inputs' (a file) and 'outputs' (output name -> "
                "file)")
    for name in [section["inputs"], *outputs.values()]:
        if name not in files:
            return (f"manifest.json refers to {name!r} but does not list it under 'files'")
    return None


def manifest_problem(m: object) -> str | None:
    """The first thing wrong with a manifest, or None; one problem is enough to refuse it."""
    if not isinstance(m, dict):
        return "manifest.json is not a JSON object"
    version = m.get("schema_version")  # first: another version may lay out its fields otherwise
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        return (f"manifest schema version {version} is not supported "
                f"(this storyscan reads version {SCHEMA_VERSION})")
    for field, kind in _FIELDS.items():
        try:
            value = _get(m, field)
        except KeyError:
            return f"manifest.json lacks field '{field}'"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"manifest.json field '{field}' has the wrong type"
    for field, kind in _OPTIONAL_FIELDS.items():
        try:
            value = _get(m, field)
        except KeyError:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"manifest.json field '{field}' has the wrong type"
    threshold = m["heads"]["fine"].get("unknown_threshold", 0)
    if not -1 <= threshold <= 1:
        return "manifest.json 'heads.fine.unknown_threshold' must lie in [-1, 1]"
    attributes = m["heads"].get("attributes")
    if attributes is not None and (problem := _attributes_problem(attributes)):
        return problem
    try:
        InputSpec.from_dict(m["input"])
    except (KeyError, TypeError, ValueError) as e:
        return f"manifest.json field 'input' is invalid ({e})"
    fine, coarse = m["heads"]["fine"]["labels"], m["heads"]["coarse"]["labels"]
    of_fine = m["heads"]["coarse"]["of_fine"]
    if not fine or not all(isinstance(x, str) for x in fine + coarse):
        return "manifest.json label lists must be non-empty lists of strings"
    if len(set(fine)) != len(fine):
        return "manifest.json fine labels are not unique"
    if len(of_fine) != len(fine) or not all(
        isinstance(c, int) and 0 <= c < len(coarse) for c in of_fine
    ):
        return "manifest.json 'heads.coarse.of_fine' does not map every fine label to a category"
    if (not m["models"] or set(m["models"]) - set(PRECISIONS)
            or not all(isinstance(v, str) for v in m["models"].values())):
        return f"manifest.json 'models' must name files for {' and/or '.join(PRECISIONS)}"
    for name in [*m["models"].values(), m["heads"]["fine"]["prototypes"]]:
        if name not in m["files"]:
            return f"manifest.json refers to {name!r} but does not list it under 'files'"
    if "tensorrt" in m and (problem := _tensorrt_problem(m["tensorrt"], m["files"])):
        return problem
    if "golden" in m and (problem := _golden_problem(m["golden"], m["files"])):
        return problem
    for name, entry in m["files"].items():
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            return f"manifest.json lists a file with an unsafe name: {name!r}"
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            return f"manifest.json entry for {name!r} needs 'sha256' and 'bytes'"
    return None


# --- the loaded bundle -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict
    digest: str  # sha256 of manifest.json, which pins every file by hash

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def key(self) -> str:
        """Identifies this exact model: reference embeddings in the catalog are stored under it."""
        return f"{self.name}@{self.version}#{self.digest[:12]}"

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.manifest["input"])

    @property
    def fine_labels(self) -> list[str]:
        return self.manifest["heads"]["fine"]["labels"]

    @property
    def coarse_labels(self) -> list[str]:
        return self.manifest["heads"]["coarse"]["labels"]

    @property
    def coarse_of_fine(self) -> list[int]:
        return self.manifest["heads"]["coarse"]["of_fine"]

    @property
    def embedding_dim(self) -> int:
        return self.manifest["heads"]["embedding"]["dim"]

    @property
    def scale(self) -> float:
        """Cosine-softmax temperature of the fine head: turns similarity into confidence."""
        return float(self.manifest["heads"]["fine"]["scale"])

    @property
    def unknown_threshold(self) -> float | None:
        """Best similarity below which a scan is unknown (calibrated at export on validation
        photos); None for bundles exported before open-set recognition."""
        value = self.manifest["heads"]["fine"].get("unknown_threshold")
        return None if value is None else float(value)

    @property
    def attribute_labels(self) -> list[str]:
        """Names of the attribute head's outputs; empty for a bundle without that head."""
        return self.manifest["heads"].get("attributes", {}).get("labels", [])

    @property
    def attribute_threshold(self) -> float:
        """Probability above which an attribute is reported (0.5: a logit above 0)."""
        return float(self.manifest["heads"].get("attributes", {}).get("threshold", 0.5))

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.manifest["models"]]

    def model_path(self, precision: str) -> Path:
        if precision not in self.manifest["models"]:
            raise BundleError(self.path, f"has no {precision} model (it has: "
                                         f"{', '.join(self.precisions)})")
        return self.path / self.manifest["models"][precision]

    def prototypes(self) -> np.ndarray:
        """One L2-normalised embedding per trained product ([fine, dim] float32)."""
        name = self.manifest["heads"]["fine"]["prototypes"]
        try:
            protos = load_array(self.path / name)
        except (OSError, ValueError) as e:
            raise BundleError(self.path, f"prototypes file {name!r} is not a numpy array "
                                         f"({e})") from None
        if protos.shape != (len(self.fine_labels), self.embedding_dim):
            raise BundleError(self.path, f"prototypes have shape {protos.shape}, expected "
                                         f"({len(self.fine_labels)}, {self.embedding_dim})")
        return protos.astype(np.float32)


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle after checking its schema and every file's size and hash."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(path, "is not a bundle directory")
    manifest_file = path / MANIFEST
    try:
        raw = manifest_file.read_bytes()
    except FileNotFoundError:
        raise BundleError(path, f"has no {MANIFEST}") from None
    except OSError as e:
        raise BundleError(path, f"cannot read {MANIFEST} ({e.strerror or e})") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(path, f"{MANIFEST} is not valid JSON ({e})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise BundleError(path, problem)
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise BundleError(path, f"file {name!r} listed in the manifest is missing")
        if f.stat().st_size != entry["bytes"]:
            raise BundleError(path, f"file {name!r} has {f.stat().st_size} bytes, the manifest "
                                    f"says {entry['bytes']} (changed or truncated)")
        if sha256_file(f) != entry["sha256"]:
            raise BundleError(path, f"file {name!r} does not match its sha256 in the manifest "
                                    "(changed after export)")
    return Bundle(path=path, manifest=manifest, digest=hashlib.sha256(raw).hexdigest())


def write_bundle(out: str | Path, manifest: dict, files: dict[str, Path]) -> Bundle:
    """Write a bundle atomically: staged beside `out`, fsynced, then renamed into place.

    `manifest` is everything but 'schema_version', 'created' and 'files', which are filled in
    here; `files` maps names in the bundle to the files to copy there.
    """
    out = Path(out)
    listed = {name: {"sha256": sha256_file(Path(src)), "bytes": Path(src).stat().st_size}
              for name, src in files.items()}
    full = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **manifest,
        "files": listed,
    }
    problem = manifest_problem(full)  # checked before copying: a name like '../x' writes nothing
    if problem:
        raise BundleError(out, problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, src in files.items():
            shutil.copyfile(src, stage / name)
        (stage / MANIFEST).write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n")
        for f in stage.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old)
        else:
            stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return load_bundle(out)  # also checks the copies against their sources' hashes
