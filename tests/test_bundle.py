"""Model bundles: a valid one loads with everything the kiosk needs; anything changed, missing
or malformed is refused with one line naming the bundle; writing replaces a bundle whole."""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.bundle import (
    _FIELDS,
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    load_array,
    load_bundle,
    write_bundle,
)
from models.preprocess import InputSpec

FINE, COARSE, OF_FINE, DIM = ["a", "b", "c"], ["x", "y"], [0, 0, 1], 8


def manifest() -> dict:
    """Everything but schema_version, created and files, which write_bundle fills in."""
    return {
        "name": "t",
        "version": "1",
        "architecture": "efficientnet_lite0",
        "input": InputSpec(size=64, resize=73).to_dict(),
        "heads": {
            "embedding": {"output": "embedding", "dim": DIM},
            "fine": {"output": "fine", "labels": list(FINE), "prototypes": "prototypes.npy",
                     "scale": 16.0},
            "coarse": {"output": "coarse", "labels": list(COARSE), "of_fine": list(OF_FINE)},
        },
        "models": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "metrics": {"fp32": {"fine_top1": 0.9}, "int8": {"fine_top1": 0.9}},
    }


def prototypes() -> np.ndarray:
    protos = np.random.default_rng(0).normal(size=(len(FINE), DIM)).astype(np.float32)
    return protos / np.linalg.norm(protos, axis=1, keepdims=True)


def sources(tmp_path: Path, protos: np.ndarray | None = None) -> dict[str, Path]:
    """Fake model files (loading never parses ONNX) and a prototypes array, outside the bundle."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "fp32.onnx").write_bytes(b"fp32 model bytes " * 64)
    (src / "int8.onnx").write_bytes(b"int8 model bytes " * 16)
    np.save(src / "protos.npy", prototypes() if protos is None else protos)
    return {"model_fp32.onnx": src / "fp32.onnx", "model_int8.onnx": src / "int8.onnx",
            "prototypes.npy": src / "protos.npy"}


def make_bundle(tmp_path: Path, name: str = "bundle") -> Bundle:
    return write_bundle(tmp_path / "out" / name, manifest(), sources(tmp_path))


def edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def assert_refused(path: Path, phrase: str) -> BundleError:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert phrase in message
    return info.value


def remove(dotted: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        *parents, last = dotted.split(".")
        for part in parents:
            m = m[part]
        del m[last]
    return change


def set_field(dotted: str, value: object) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        *parents, last = dotted.split(".")
        for part in parents:
            m = m[part]
        m[last] = value
    return change


def staging_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- a valid bundle ----------------------------------------------------------------------------


def test_valid_bundle_loads_with_everything_the_kiosk_needs(tmp_path: Path) -> None:
    src = sources(tmp_path)
    written = write_bundle(tmp_path / "out" / "bundle", manifest(), src)
    b = load_bundle(written.path)
    raw = (b.path / MANIFEST).read_bytes()

    assert b.key == f"t@1#{hashlib.sha256(raw).hexdigest()[:12]}" == written.key
    assert (b.name, b.version, b.architecture) == ("t", "1", "efficientnet_lite0")
    assert b.input_spec == InputSpec(size=64, resize=73)
    assert (b.fine_labels, b.coarse_labels, b.coarse_of_fine) == (FINE, COARSE, OF_FINE)
    assert b.embedding_dim == DIM
    assert b.scale == 16.0
    assert b.precisions == ["int8", "fp32"]
    assert b.model_path("fp32") == b.path / "model_fp32.onnx"
    assert b.model_path("int8").read_bytes() == src["model_int8.onnx"].read_bytes()
    protos = b.prototypes()
    assert protos.shape == (len(FINE), DIM)
    assert protos.dtype == np.float32
    assert np.array_equal(protos, prototypes())

    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["created"].endswith("Z")
    assert m["metrics"] == manifest()["metrics"]
    assert m["files"] == {
        name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
        for name, p in src.items()
    }


def test_bundle_with_one_precision_says_which_it_has(tmp_path: Path) -> None:
    m = manifest()
    m["models"] = {"fp32": "model_fp32.onnx"}
    b = write_bundle(tmp_path / "bundle", m, sources(tmp_path))
    assert b.precisions == ["fp32"]
    with pytest.raises(BundleError, match=r"has no int8 model \(it has: fp32\)"):
        b.model_path("int8")


def test_key_is_stable_across_loads_and_changes_with_the_manifest(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    assert load_bundle(b.path).key == b.key
    edit_manifest(b.path, set_field("metrics.int8.fine_top1", 0.8))
    changed = load_bundle(b.path)
    assert changed.key != b.key
    assert changed.key.startswith("t@1#")


def test_unknown_threshold_is_read_when_exported_and_absent_from_older_bundles(
    tmp_path: Path,
) -> None:
    assert make_bundle(tmp_path).unknown_threshold is None
    m = manifest()
    m["heads"]["fine"] |= {"unknown_threshold": 0.62, "unknown_tar": 0.95}
    b = write_bundle(tmp_path / "calibrated", m, sources(tmp_path))
    assert load_bundle(b.path).unknown_threshold == 0.62


@pytest.mark.parametrize(("field", "value", "phrase"), [
    ("heads.fine.unknown_threshold", "0.6", "has the wrong type"),
    ("heads.fine.unknown_threshold", True, "has the wrong type"),
    ("heads.fine.unknown_tar", None, "has the wrong type"),
    ("heads.fine.unknown_threshold", 1.5, "must lie in [-1, 1]"),
])
def test_malformed_unknown_threshold_is_refused(
    tmp_path: Path, field: str, value: object, phrase: str,
) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field(field, value))
    assert_refused(b.path, phrase)


ATTRIBUTE_HEAD = {"output": "attributes", "labels": ["cobalt", "floral"], "threshold": 0.5}


def test_attribute_head_is_read_when_exported_and_absent_from_bundles_without_it(
    tmp_path: Path,
) -> None:
    plain = make_bundle(tmp_path)
    assert plain.attribute_labels == []
    m = manifest()
    m["heads"]["attributes"] = dict(ATTRIBUTE_HEAD)
    b = load_bundle(write_bundle(tmp_path / "attributes", m, sources(tmp_path)).path)
    assert (b.attribute_labels, b.attribute_threshold) == (["cobalt", "floral"], 0.5)


@pytest.mark.parametrize(("field", "value", "phrase"), [
    ("heads.attributes", ["cobalt"], "'heads.attributes' has the wrong type"),
    ("heads.attributes.output", "fine", "'heads.attributes.output' must be 'attributes'"),
    ("heads.attributes.labels", [], "non-empty list of unique strings"),
    ("heads.attributes.labels", ["a", "a"], "non-empty list of unique strings"),
    ("heads.attributes.labels", ["a", 3], "non-empty list of unique strings"),
    ("heads.attributes.threshold", 1.0, "must be a probability in (0, 1)"),
    ("heads.attributes.threshold", "0.5", "must be a probability in (0, 1)"),
])
def test_malformed_attribute_head_is_refused(
    tmp_path: Path, field: str, value: object, phrase: str,
) -> None:
    m = manifest()
    m["heads"]["attributes"] = dict(ATTRIBUTE_HEAD)
    b = write_bundle(tmp_path / "b", m, sources(tmp_path))
    edit_manifest(b.path, set_field(field, value))
    assert_refused(b.path, phrase)


def test_attribute_head_without_its_labels_is_refused(tmp_path: Path) -> None:
    m = manifest()
    m["heads"]["attributes"] = dict(ATTRIBUTE_HEAD)
    b = write_bundle(tmp_path / "b", m, sources(tmp_path))
    edit_manifest(b.path, remove("heads.attributes.labels"))
    assert_refused(b.path, "'heads.attributes.labels' must be")


# --- refusals ----------------------------------------------------------------------------------


def test_model_file_changed_by_one_byte_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    model = b.path / "model_int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    error = assert_refused(b.path, "'model_int8.onnx' does not match its sha256")
    assert "changed after export" in error.problem


def test_truncated_file_is_refused_by_its_size(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    model = b.path / "model_fp32.onnx"
    data = model.read_bytes()
    model.write_bytes(data[:100])
    assert_refused(b.path, f"'model_fp32.onnx' has 100 bytes, the manifest says {len(data)}")


def test_listed_file_missing_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    (b.path / "prototypes.npy").unlink()
    assert_refused(b.path, "'prototypes.npy' listed in the manifest is missing")


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    (b.path / MANIFEST).unlink()
    assert_refused(b.path, "has no manifest.json")


def test_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nowhere", "is not a bundle directory")
    (tmp_path / "file.onnx").write_bytes(b"onnx")
    assert_refused(tmp_path / "file.onnx", "is not a bundle directory")


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage"])
def test_manifest_that_is_not_json_is_refused(tmp_path: Path, content: bytes) -> None:
    b = make_bundle(tmp_path)
    (b.path / MANIFEST).write_bytes(content)
    assert_refused(b.path, "manifest.json is not valid JSON")


def test_manifest_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    (b.path / MANIFEST).write_text("[1, 2, 3]")
    assert_refused(b.path, "not a JSON object")


@pytest.mark.parametrize("field", list(_FIELDS))
def test_manifest_missing_a_required_field_is_refused(tmp_path: Path, field: str) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, remove(field))
    assert_refused(b.path, f"lacks field '{field}'")


@pytest.mark.parametrize(("field", "value"), [
    ("schema_version", "1"),
    ("schema_version", True),
    ("name", 5),
    ("heads.embedding.dim", "8"),
    ("heads.fine.labels", "abc"),
    ("heads.fine.scale", True),
    ("heads.coarse", ["x", "y"]),
    ("files", []),
])
def test_manifest_field_of_the_wrong_type_is_refused(
    tmp_path: Path, field: str, value: object,
) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field(field, value))
    assert_refused(b.path, f"field '{field}' has the wrong type")


@pytest.mark.parametrize("value", [["model_fp32.onnx"], 3, None])
def test_model_entry_that_is_not_a_file_name_is_refused(tmp_path: Path, value: object) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("models.fp32", value))
    assert_refused(b.path, "'models' must name files")


def test_models_with_an_unknown_precision_are_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("models.fp16", "model_fp32.onnx"))
    assert_refused(b.path, "'models' must name files for int8 and/or fp32")


@pytest.mark.parametrize("version", [0, 2])
def test_unsupported_schema_version_is_refused(tmp_path: Path, version: int) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("schema_version", version))
    assert_refused(b.path, f"schema version {version} is not supported")


def test_newer_schema_is_refused_by_version_even_if_its_fields_differ(tmp_path: Path) -> None:
    def version_2(m: dict) -> None:
        m["schema_version"] = 2
        m["heads"] = {"product": m["heads"]["fine"]}

    b = make_bundle(tmp_path)
    edit_manifest(b.path, version_2)
    assert_refused(b.path, f"(this storyscan reads version {SCHEMA_VERSION})")


def test_invalid_input_spec_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("input.size", 512))  # larger than resize
    assert_refused(b.path, "field 'input' is invalid")


def test_duplicated_fine_labels_are_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("heads.fine.labels", ["a", "b", "a"]))
    assert_refused(b.path, "fine labels are not unique")


@pytest.mark.parametrize("of_fine", [[0, 0, 2], [0, -1, 1], [0, 1], [0, 1, "1"]])
def test_coarse_mapping_out_of_range_is_refused(tmp_path: Path, of_fine: list) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("heads.coarse.of_fine", of_fine))
    assert_refused(b.path, "'heads.coarse.of_fine' does not map every fine label")


@pytest.mark.parametrize("labels", [[], ["a", 2, "c"]])
def test_fine_labels_that_are_not_strings_are_refused(tmp_path: Path, labels: list) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("heads.fine.labels", labels))
    assert_refused(b.path, "label lists must be non-empty lists of strings")


@pytest.mark.parametrize("unsafe", ["../model_fp32.onnx", "sub/model_fp32.onnx",
                                    "/etc/model_fp32.onnx", "..", MANIFEST])
def test_file_name_escaping_the_bundle_is_refused(tmp_path: Path, unsafe: str) -> None:
    def point_outside(m: dict) -> None:
        m["files"][unsafe] = m["files"].pop("model_fp32.onnx")
        m["models"]["fp32"] = unsafe

    b = make_bundle(tmp_path)
    edit_manifest(b.path, point_outside)
    assert_refused(b.path, f"lists a file with an unsafe name: {unsafe!r}")


def test_model_not_listed_under_files_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, set_field("models.int8", "other.onnx"))
    assert_refused(b.path, "refers to 'other.onnx' but does not list it under 'files'")


def test_file_entry_without_hash_is_refused(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    edit_manifest(b.path, lambda m: m["files"]["prototypes.npy"].pop("sha256"))
    assert_refused(b.path, "entry for 'prototypes.npy' needs 'sha256' and 'bytes'")


def test_prototypes_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    wrong = np.zeros((len(FINE) + 1, DIM), np.float32)
    b = write_bundle(tmp_path / "bundle", manifest(), sources(tmp_path, wrong))
    with pytest.raises(BundleError) as info:
        b.prototypes()
    assert str(info.value) == (f"{b.path}: prototypes have shape (4, 8), "
                               f"expected ({len(FINE)}, {DIM})")


def test_prototypes_that_are_not_a_numpy_array_are_refused(tmp_path: Path) -> None:
    src = sources(tmp_path)
    src["prototypes.npy"].write_bytes(b"not an array")
    b = write_bundle(tmp_path / "bundle", manifest(), src)
    with pytest.raises(BundleError) as info:
        b.prototypes()
    message = str(info.value)
    assert message.startswith(f"{b.path}: prototypes file 'prototypes.npy' is not a numpy array")
    assert "\n" not in message


# --- writing -----------------------------------------------------------------------------------


def test_write_bundle_replaces_an_existing_bundle_whole(tmp_path: Path) -> None:
    src = sources(tmp_path)
    notes = tmp_path / "src" / "notes.txt"
    notes.write_text("first export")
    out = tmp_path / "out" / "bundle"
    first = write_bundle(out, manifest(), {**src, "notes.txt": notes})

    m = manifest()
    m["version"] = "2"
    second = write_bundle(out, m, src)

    loaded = load_bundle(out)
    assert loaded.version == "2"
    assert loaded.key == second.key != first.key
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *src])
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def test_failed_write_keeps_the_old_bundle_and_leaves_nothing_behind(tmp_path: Path) -> None:
    old = make_bundle(tmp_path)
    bad = manifest()
    bad["heads"]["fine"]["labels"] = ["a", "a", "b"]
    with pytest.raises(BundleError, match="fine labels are not unique") as info:
        write_bundle(old.path, bad, sources(tmp_path))
    assert str(info.value).startswith(f"{old.path}: ")
    assert load_bundle(old.path).key == old.key
    assert staging_leftovers(old.path.parent) == []


def test_write_refuses_an_unsafe_name_before_writing_anything(tmp_path: Path) -> None:
    src = sources(tmp_path)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(BundleError, match="unsafe name"):
        write_bundle(out, manifest(), {**src, "../escaped.onnx": src["model_fp32.onnx"]})
    assert not (tmp_path / "out" / "escaped.onnx").exists()
    assert not out.exists()


def test_write_cleans_up_a_stale_old_bundle_from_an_interrupted_replace(tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    stale = b.path.with_name(f".{b.path.name}.old")
    stale.mkdir()
    (stale / "junk").write_text("left by a crash")
    make_bundle(tmp_path)
    assert staging_leftovers(b.path.parent) == []


def test_arrays_load_from_many_threads_at_once(tmp_path: Path) -> None:
    """A kiosk loads bundle arrays on several threads (a model update's self-test beside the
    catalog); on CPython 3.11.0-3.11.7 and 3.12.0-3.12.1 two numpy loads at once, with a garbage
    collection inside one, failed with SystemError (gh-106905). Collections and thread switches
    are made as frequent as they go, so without load_array's lock this fails there; on later
    Pythons it passes either way."""
    path = tmp_path / "a.npy"
    np.save(path, np.arange(32, dtype=np.float32).reshape(4, 8))
    errors: list[BaseException] = []

    def collecting(phase: str, info: dict) -> None:
        [str(i) for i in range(100)]  # Python code inside a collection: threads may switch

    def load_many() -> None:
        try:
            for _ in range(200):
                [[] for _ in range(20)]  # allocations, so collections come mid-parse
                assert load_array(path).shape == (4, 8)
        except BaseException as e:  # reported by the assert below
            errors.append(e)

    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.callbacks.append(collecting)
    gc.set_threshold(5)
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=load_many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        gc.callbacks.remove(collecting)
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
