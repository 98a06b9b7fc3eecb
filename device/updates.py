"""Model releases, the device's side: download, verify, self-test, switch, roll back.

The agent subscribes to its group's retained `storyscan/v1/<fleet>/groups/<group>/release/model`
(fleet/release.py publishes it), so a device that was offline when a release went out gets it
when it reconnects. Each release is handled on a worker thread of its own (the agent's thread
keeps sending scans) and its result is acked on the device's `ack` topic like a command's
(`"command": "release-model"`), ok or with the reason it was refused. A release that is part of
a staged rollout (fleet/rollout.py) carries `rollout.targets`, the devices of its waves so far:
a device not named there waits for the republished message that names it, and no device not
yet on a halted rollout (`rollout.halted`) takes it.

1. version: a release whose version is not newer than the running bundle's is refused (dotted
   numbers compare numerically, "10" after "9"; other versions compare as text). So is one the
   operator rolled back from. The same release arriving again (a reconnect) is ignored quietly.
2. download over HTTP into `<releases>/staging/<sha256>.part`, resuming with `Range: bytes=N-`
   where a previous attempt stopped (a server that answers 200 instead of 206 starts it over).
3. verify: size and sha256 of the archive as the message says; the archive holds only plain
   files with plain names, manifest.json among them; the Ed25519 signature (the operator's, from
   the public key given at provisioning, `release_key` in the device config) over the exact
   bytes of that manifest.json; the manifest's version is the message's.
4. unpack into a staged folder, `load_bundle` it (every file's size and sha256 against the
   signed manifest), and self-test: open its engine (device.engines.open_engine) and run the
   bundle's golden inputs (`golden` in the manifest, written by the export): every embedding
   must be within the bundle's `min_cosine` of the recorded one. A bundle without golden data
   must still open and give finite outputs of the right shape.
5. switch: the staged folder is fsynced and renamed to `<releases>/bundles/<version>-<digest>`;
   in the kiosk's process the new Pipeline is opened on the kiosk's thread (`submit_job`) and
   replaces the old one; then `<releases>/current` (a symlink, replaced with os.replace of a new
   one) points at it and `<releases>/previous` at the bundle it replaced, and the device
   config's `paths.bundle` becomes `<releases>/current` (written atomically), so a restarted
   kiosk loads it too. The standalone agent switches the files; the kiosk loads the new model
   when it restarts.

Any failure leaves the old model serving and the staged files removed (a partial download is
kept to resume). `rollback` (a command) swaps `current` and `previous` back and, in the kiosk's
process, loads the previous bundle; the release rolled back from is then refused until a newer
one comes. Installed bundles other than the current and the previous one are removed.

Steps 2 and 3 (download with resume, size and sha256, plain files, the signature) are functions
here that catalog releases (device/catalog_updates.py) use as well.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device.files import write_json_atomic
from device.sync import Agent, DeviceConfig, Result, group_topic
from models.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    load_array,
    load_bundle,
    sha256_file,
)

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("storyscan.updates")

RELEASE_COMMAND = "release-model"
CHUNK = 1 << 16


class ReleaseRefused(Exception):
    """A release the device will not run; str() is the reason, acked to the controller."""


def version_key(version: str) -> tuple:
    """Dotted numbers compare numerically ("10" after "9", "1.10" after "1.9"); a version
    that is not one compares as text, after every numeric one."""
    parts = str(version).split(".")
    if all(p.isdecimal() for p in parts):
        return (0, tuple(int(p) for p in parts))
    return (1, str(version))


def newer(candidate: str, running: str | None) -> bool:
    return running is None or version_key(candidate) > version_key(running)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ReleaseRefused(f"cannot read the release public key {path} ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseRefused(f"{path} is not an Ed25519 public key")
    return key


# --- shared by model and catalog releases (device/catalog_updates.py) ----------------------------


def require_fields(release: dict, version: type) -> None:
    """The fields every release message has: version (of the kind's type), url, size, sha256
    and signature."""
    for name, kind in (("version", version), ("url", str), ("size", int), ("sha256", str),
                       ("signature", str)):
        value = release.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ReleaseRefused(f"the release message lacks {name!r}")


def release_public_key(config: DeviceConfig) -> Ed25519PublicKey:
    """The operator's public key given at provisioning (`release_key` in the device config)."""
    key_file = config.data.get("release_key")
    if not key_file:
        raise ReleaseRefused("no release public key was provisioned (storyscan provision "
                             "--release-key)")
    return load_public_key(config.base / key_file)


def download(url: str, sha: str, size: int, staging: Path, timeout_s: float) -> Path:
    """Into `<staging>/<sha>.part`, resuming where the last attempt stopped; checked."""
    if not url.startswith(("http://", "https://")):
        raise ReleaseRefused(f"the release URL {url!r} is not http(s)")
    staging.mkdir(parents=True, exist_ok=True)
    part = staging / f"{sha}.part"
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        request = urllib.request.Request(url)
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                mode = "ab" if have and response.status == 206 else "wb"
                if mode == "wb":
                    have = 0
                with open(part, mode) as f:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ReleaseRefused(f"download from {url} failed ({e}); "
                                 f"{part.stat().st_size if part.exists() else 0} bytes "
                                 "kept to resume") from None
    got = part.stat().st_size
    if got < size:
        raise ReleaseRefused(f"truncated download: {got} of {size} bytes; kept to resume "
                             "next time")
    if got != size:
        part.unlink()
        raise ReleaseRefused(f"size mismatch: {got} bytes, the release says {size}")
    if sha256_file(part) != sha:
        part.unlink()
        raise ReleaseRefused("sha256 mismatch: the archive is not the one released")
    return part


@contextlib.contextmanager
def fetched(release: dict, config: DeviceConfig, staging: Path, timeout_s: float
            ) -> Iterator[tuple[Ed25519PublicKey, Path, Path]]:
    """(the operator's public key, the release's archive downloaded and checked, an empty
    folder to unpack it in); on leaving, the folder and the archive are deleted: verified or
    refused, the archive is not to be resumed."""
    public = release_public_key(config)
    archive = download(release["url"], release["sha256"], release["size"], staging, timeout_s)
    stage = staging / f"{release['sha256'][:16]}.d"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        yield public, archive, stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        archive.unlink(missing_ok=True)


def unpack(archive: Path, stage: Path) -> bytes:
    """Into the new folder `stage`: plain files with plain names only, manifest.json and the
    files its `files` lists; returns manifest.json's bytes."""
    stage.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            if MANIFEST not in names or len(set(names)) != len(names):
                raise ReleaseRefused("the archive has no manifest.json (or a name twice)")
            for m in members:
                if not m.isfile() or Path(m.name).name != m.name or m.name in ("", ".", ".."):
                    raise ReleaseRefused(f"the archive holds {m.name!r}, not a plain file")
            raw = tar.extractfile(MANIFEST).read()  # type: ignore[union-attr]
            try:
                listed = set(json.loads(raw).get("files") or {})
            except (ValueError, AttributeError):
                raise ReleaseRefused("manifest.json is not valid JSON") from None
            extra = set(names) - listed - {MANIFEST}
            if extra:
                raise ReleaseRefused(f"the archive holds files its manifest does not list: "
                                     f"{', '.join(sorted(extra))}")
            for m in members:
                src = tar.extractfile(m)
                assert src is not None
                with open(stage / m.name, "wb") as out:
                    shutil.copyfileobj(src, out)
    except tarfile.TarError as e:
        raise ReleaseRefused(f"the archive is unreadable ({e})") from None
    return raw


def verify_signature(public: Ed25519PublicKey, signature: str, raw: bytes) -> dict:
    """The operator's Ed25519 signature (base64) over the exact manifest bytes; returns the
    manifest."""
    try:
        public.verify(base64.b64decode(signature, validate=True), raw)
    except (InvalidSignature, ValueError):
        raise ReleaseRefused("the signature does not match the manifest (not signed with the "
                             "operator's key, or altered)") from None
    return json.loads(raw)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_link(link: Path, target: Path) -> None:
    """Point the symlink `link` at `target` atomically (a new link renamed over it)."""
    tmp = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def self_test(bundle: Bundle, backend: str = "auto", precision: str = "int8") -> str:
    """Run the bundle's golden inputs through its engine; raises ReleaseRefused when the
    outputs are off. Returns what was checked."""
    from device.engines import open_engine

    try:
        engine = open_engine(bundle, backend, precision)
    except Exception as e:
        raise ReleaseRefused(f"self-test: the engine does not open ({e})") from None
    golden = bundle.manifest.get("golden")
    if not golden:
        spec = bundle.input_spec
        x = np.zeros((1, 3, spec.size, spec.size), np.float32)
        out = engine.infer(x)
        emb = out.get("embedding")
        if emb is None or emb.shape != (1, bundle.embedding_dim) or not np.isfinite(emb).all():
            raise ReleaseRefused("self-test: the engine's embedding output is wrong")
        return "self-test: engine opens (no golden inputs in this bundle)"
    inputs = load_array(bundle.path / golden["inputs"])
    out = engine.infer(inputs.astype(np.float32))
    min_cosine = float(golden.get("min_cosine", 0.98))
    for name, file in golden["outputs"].items():
        expected = load_array(bundle.path / file)
        got = out.get(name)
        if got is None or got.shape != expected.shape:
            raise ReleaseRefused(f"self-test: output {name!r} has shape "
                                 f"{None if got is None else got.shape}, expected "
                                 f"{expected.shape}")
        a = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
        b = expected / np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-12)
        cosine = float(np.min(np.sum(a * b, axis=1)))
        if not cosine >= min_cosine:
            raise ReleaseRefused(f"self-test failed: golden {name} cosine {cosine:.4f} below "
                                 f"{min_cosine:g}")
    return f"self-test passed on {len(inputs)} golden inputs"


def read_release(message: mqtt.MQTTMessage) -> tuple[dict | None, str | None]:
    """A retained release message (model or catalog) as (release, None); (None, None) when it
    was cleared (empty payload); (None, why) when it cannot be read. `sha256` is text."""
    if not message.payload:
        return None, None
    try:
        release = json.loads(message.payload)
        if not isinstance(release, dict):
            raise ValueError("not a JSON object")
        release["sha256"] = str(release["sha256"])
    except (ValueError, KeyError) as e:
        return None, str(e)
    return release, None


class ModelUpdater:
    """Plugs into an Agent: the group's release topic and the `rollback` command."""

    def __init__(self, agent: Agent, backend: str = "auto", timeout_s: float = 60.0) -> None:
        self.agent, self.config = agent, agent.config
        self.backend, self.timeout_s = backend, timeout_s
        self.root = self.config.path_of("releases", "releases")
        assert self.root is not None
        self.bundles, self.staging = self.root / "bundles", self.root / "staging"
        self.current, self.previous = self.root / "current", self.root / "previous"
        self.state_file = self.root / "state.json"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model-release")
        self._lock = threading.Lock()  # one switch or rollback at a time
        self._busy: set[str] = set()  # sha256 of releases being handled
        self._seen: set[str] = set()  # handled by this process (ok or refused for good)
        self.topic = group_topic(self.config.fleet, self.config.group, "release/model")
        agent.add_route(self.topic, self.on_message)
        agent.handlers["rollback"] = lambda _agent, args: self.rollback()

    # --- where things are ----------------------------------------------------------------------

    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, state, mode=0o644)

    def running(self) -> tuple[str | None, str | None, Path | None]:
        """(version, digest, folder) of the bundle in use."""
        kiosk = self.agent.kiosk
        if kiosk is not None:
            b = kiosk.pipeline.bundle
            return b.version, b.digest, Path(b.path).resolve()
        path = self.config.path_of("bundle")
        if path is None:
            return None, None, None
        try:
            raw = (path / MANIFEST).read_bytes()
            return json.loads(raw)["version"], hashlib.sha256(raw).hexdigest(), path.resolve()
        except (OSError, ValueError, KeyError, TypeError):
            return None, None, None

    # --- the agent's thread --------------------------------------------------------------------

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        release, problem = read_release(message)
        if problem:
            self._report(Result(False, f"unreadable release message ({problem})"))
        if release is None:
            return
        sha = release["sha256"]
        if sha in self._busy or sha in self._seen:
            return
        if not self.targeted(release):
            return  # not this device's wave (yet), or the rollout was halted
        self._busy.add(sha)
        future = self._pool.submit(self.apply, release)
        future.add_done_callback(lambda _f: self._busy.discard(sha))
        self._report(future)

    def targeted(self, release: dict) -> bool:
        """Whether this device takes the release now. A staged rollout (fleet/rollout.py)
        names the devices of the waves so far in `rollout.targets` and republishes the
        retained message as it advances; without it the whole group takes the release. A
        halted rollout is taken by no one not yet on it."""
        rollout = release.get("rollout")
        if not isinstance(rollout, dict):
            return True
        if rollout.get("halted"):
            log.info("release %s: rollout halted; not installing", release.get("version"))
            return False
        targets = rollout.get("targets")
        return not isinstance(targets, list) or self.config.device in targets

    def _report(self, result: Result | Future) -> None:
        """Ack on the agent's thread (the outbox's connection lives there)."""
        if isinstance(result, Future):
            self.agent.ack_when_done(None, RELEASE_COMMAND, result)
        else:
            self.agent._ack(None, RELEASE_COMMAND, result)

    # --- the worker thread ---------------------------------------------------------------------

    def apply(self, release: dict) -> Result:
        """Everything from the version check to the switch; a Result either way."""
        version = str(release.get("version"))
        try:
            message = self._apply(release)
        except ReleaseRefused as e:
            log.warning("release %s refused: %s", version, e)
            return Result(False, f"release {version} refused: {e}",
                          {"version": version, "refused": str(e)})
        except Exception as e:
            log.exception("release %s failed", version)
            return Result(False, f"release {version} refused: {type(e).__name__}: {e}",
                          {"version": version, "refused": str(e)})
        return Result(True, message, {"version": version, "bundle": str(self.current)})

    def _apply(self, release: dict) -> str:
        require_fields(release, version=str)
        version, sha = release["version"], release["sha256"]
        if sha in self._state().get("rolled_back", []):
            self._seen.add(sha)
            raise ReleaseRefused("the operator rolled this release back")
        running, _, old = self.running()
        if not newer(version, running):
            self._seen.add(sha)
            raise ReleaseRefused(f"version {version} is not newer than the running "
                                 f"{running}")
        with fetched(release, self.config, self.staging, self.timeout_s) as (public, archive,
                                                                               stage):
            final, checked = self._install(release, archive, stage, public)
        with self._lock:
            try:
                self._load_into_kiosk(final)
            except Exception as e:
                shutil.rmtree(final, ignore_errors=True)
                raise ReleaseRefused(f"the kiosk could not load it ({e})") from None
            self._switch(final, old)
            state = self._state()
            state.setdefault("installed", {})[sha] = str(final.resolve())
            self._save_state(state)
        self._seen.add(sha)
        where = ("loaded by the kiosk" if self.agent.kiosk is not None
                 else "the kiosk loads it when it restarts")
        return (f"model {version} installed ({checked}; previous {running} kept for "
                f"rollback; {where})")

    def _install(self, release: dict, archive: Path, stage: Path, public: Ed25519PublicKey
                 ) -> tuple[Path, str]:
        """Verify and unpack the archive, check and self-test the bundle, then rename it into
        `<releases>/bundles/`; returns the folder and what the self-test checked."""
        version = release["version"]
        manifest = verify_signature(public, release["signature"], unpack(archive, stage))
        if manifest.get("version") != version:
            raise ReleaseRefused(f"the manifest says version {manifest.get('version')!r}, "
                                 f"the release {version!r}")
        try:
            bundle = load_bundle(stage)
        except BundleError as e:
            raise ReleaseRefused(f"bundle check failed: {e.problem}") from None
        checked = self_test(bundle, self.backend)
        for f in stage.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(stage)
        self.bundles.mkdir(parents=True, exist_ok=True)
        final = self.bundles / f"{_safe(version)}-{bundle.digest[:12]}"
        shutil.rmtree(final, ignore_errors=True)
        os.rename(stage, final)
        _fsync_dir(self.bundles)
        return final, checked

    # --- switching -----------------------------------------------------------------------------

    def _load_into_kiosk(self, folder: Path) -> None:
        """In the kiosk's process: open the new Pipeline on the kiosk's thread (its engine and
        SQLite connections live there) and put it in place of the old one."""
        kiosk = self.agent.kiosk
        if kiosk is None:
            return
        from device.pipeline import Pipeline

        old = kiosk.pipeline

        def swap() -> str:
            pipeline = Pipeline.open(folder, old.catalog.path, precision=old.engine.precision,
                                     backend=self.backend, top_coarse=old.top_coarse,
                                     hash_candidates=old.matcher.hash_candidates,
                                     category_prior=old.category_prior)
            kiosk.pipeline = pipeline
            return pipeline.bundle.key

        kiosk.submit_job(swap).result(timeout=self.timeout_s * 5)

    def _switch(self, target: Path, old: Path | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if old is not None and old != target.resolve():
            _swap_link(self.previous, old)
        _swap_link(self.current, target.resolve())
        _fsync_dir(self.root)
        self._record_bundle_path()
        self._prune()

    def _prune(self) -> None:
        """Keep the current and the previous bundle; older installed ones go."""
        keep = {p.resolve() for p in (self.current, self.previous) if p.exists()}
        if not self.bundles.is_dir():
            return
        for folder in self.bundles.iterdir():
            if folder.resolve() not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _record_bundle_path(self) -> None:
        data = json.loads(json.dumps(self.config.data))
        data.setdefault("paths", {})["bundle"] = str(self.current)
        write_json_atomic(self.config.path, data)
        self.config.data = data

    def rollback(self) -> Result | Future:
        """Back to the previous bundle (the `rollback` command)."""
        def run() -> Result:
            with self._lock:
                if not self.previous.is_symlink() or not self.previous.exists():
                    return Result(False, "nothing to roll back to: no previous bundle kept")
                back = self.previous.resolve()
                now = self.current.resolve() if self.current.exists() else None
                try:
                    bundle = load_bundle(back)
                except BundleError as e:
                    return Result(False, f"the previous bundle is damaged: {e.problem}")
                try:
                    self._load_into_kiosk(back)
                except Exception as e:
                    return Result(False, f"the kiosk could not load the previous bundle ({e})")
                if now is not None:
                    state = self._state()
                    with contextlib.suppress(OSError):
                        rolled = state.setdefault("rolled_back", [])
                        for sha in self._shas_of(now):
                            if sha not in rolled:
                                rolled.append(sha)
                            self._seen.discard(sha)  # announced again: refused, with why
                        self._save_state(state)
                self._switch(back, now)
                return Result(True, f"rolled back to {bundle.version} ({bundle.key})",
                              {"version": bundle.version, "key": bundle.key})

        return self._pool.submit(run)

    def _shas_of(self, folder: Path) -> list[str]:
        """The archive sha256 of releases that installed `folder` (remembered at install)."""
        return [sha for sha, path in self._state().get("installed", {}).items()
                if path == str(folder)]

    def close(self) -> None:
        """Stop taking releases; one in progress finishes on its own (a switch is atomic)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:64]

