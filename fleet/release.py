"""Model releases, the operator's side: the release key, signed bundle archives, the retained
release message and a static HTTP server for the archives.

- `keygen(out)`: the operator's Ed25519 key pair (`release.key`, PKCS#8 PEM, mode 0600, kept by
  the operator; `release.pub`, given to every device by `storyscan provision --release-key`).
- `sign_manifest(bundle, key)`: an Ed25519 signature over the exact bytes of the bundle's
  manifest.json, which pins every other file by size and sha256 (models/bundle.py), so one
  signature covers the whole bundle.
- `pack(bundle, out)`: a deterministic tar (sorted names, mtime 0, owner 0, mode 0644, no
  compression: ONNX weights do not shrink) holding manifest.json and the files it lists.
- `publish_model(...)`: packs, signs, copies the archive into the artifacts folder and
  publishes the release, retained (QoS 1), on `storyscan/v1/<fleet>/groups/<group>/release/model`:
  `{"v": 1, "kind": "model", "name", "version", "key", "url", "size", "sha256", "signature",
  "manifest"}` (signature base64; manifest as parsed JSON, for people: devices verify the bytes
  in the archive). A device that is offline gets it when it reconnects.
- `serve(folder, port)`: HTTP with Range requests (`bytes=a-`, `bytes=a-b`: 206), so a device
  resumes a broken download; any static host that honours Range does as well.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.sync import BrokerSettings, ConfigError, group_topic, username
from models.bundle import MANIFEST, BundleError, load_bundle, sha256_file

PRIVATE_NAME, PUBLIC_NAME = "release.key", "release.pub"


class ReleaseError(ConfigError):
    """A release that cannot be made; one line for the user."""


def keygen(out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into `out`; refuses to overwrite one without `force`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    if private.exists() and not force:
        raise ReleaseError(f"{private} exists: devices trust its public key; give --force to "
                           "replace it (and provision every device again)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ReleaseError(f"{path}: cannot read the release private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: not an Ed25519 private key")
    return key


def sign_manifest(bundle: str | Path, key: Ed25519PrivateKey) -> bytes:
    return key.sign((Path(bundle) / MANIFEST).read_bytes())


def pack(bundle: str | Path, out: str | Path) -> None:
    """manifest.json and the files it lists, as a tar whose bytes depend on theirs alone."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / MANIFEST).read_bytes())
    names = [MANIFEST, *sorted(manifest["files"])]
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = (bundle / name).stat().st_size
            info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
            info.uname = info.gname = ""
            with open(bundle / name, "rb") as f:
                tar.addfile(info, f)


@dataclass
class Release:
    topic: str
    message: dict
    archive: Path


def make_release(bundle: str | Path, artifacts: str | Path, url_base: str,
                 key: Ed25519PrivateKey, fleet: str, group: str) -> Release:
    """Verify the bundle, pack and sign it, put the archive in `artifacts`: the message to
    publish (nothing is published here)."""
    from device.sync import check_name

    try:
        b = load_bundle(bundle)  # every file's hash checked before anything is signed
    except BundleError as e:
        raise ReleaseError(str(e)) from None
    check_name("group", group)
    artifacts = Path(artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    safe_version = re.sub(r"[^A-Za-z0-9._-]", "_", b.version)
    name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', b.name)}-{safe_version}-{b.digest[:12]}.tar"
    tmp = artifacts / f".{name}.tmp"
    pack(b.path, tmp)
    os.replace(tmp, artifacts / name)
    archive = artifacts / name
    signature = sign_manifest(b.path, key)
    message = {"v": 1, "kind": "model", "name": b.name, "version": b.version, "key": b.key,
               "url": f"{url_base.rstrip('/')}/{name}", "size": archive.stat().st_size,
               "sha256": sha256_file(archive),
               "signature": base64.b64encode(signature).decode(), "manifest": b.manifest,
               "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Release(group_topic(fleet, group, "release/model"), message, archive)


def publish(broker: BrokerSettings, fleet: str, topic: str, message: dict,
            client_name: str = "controller", timeout: float = 30.0) -> None:
    """Publish retained, QoS 1, and wait for the broker's PUBACK (PermissionError when it
    refuses: the controller's ACL must allow writing the group's release topics)."""
    client = broker.client(f"{username(fleet, client_name)}-release-{os.getpid()}",
                           reconnect=(1, 5))
    done: list = []
    connected: list = []

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        connected.append(reason_code)
        if not reason_code.is_failure:
            c.publish(topic, json.dumps(message, separators=(",", ":")), qos=1, retain=True)

    def on_publish(c, userdata, mid, reason_code, properties) -> None:
        done.append(reason_code)

    client.on_connect, client.on_publish = on_connect, on_publish
    client.connect_async(broker.host, broker.port, keepalive=broker.keepalive, clean_start=True)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done:
            if connected and connected[0].is_failure:
                raise PermissionError(f"the broker refused the connection: {connected[0]}")
            time.sleep(0.05)
        if not done:
            raise TimeoutError(f"no PUBACK from the broker within {timeout:g} s")
        if done[0].is_failure:
            raise PermissionError(f"the broker refused the release on {topic}: {done[0]}")
    finally:
        client.disconnect()
        client.loop_stop()


# --- storyscan fleet serve ---------------------------------------------------------------------

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single byte ranges (`bytes=a-`, `bytes=a-b`): 206 Partial Content,
    416 past the end; no directory listings."""

    def list_directory(self, path):  # type: ignore[override]
        self.send_error(HTTPStatus.NOT_FOUND, "no listing")
        return None

    def log_message(self, format: str, *args) -> None:
        if getattr(self.server, "quiet", False):
            return
        super().log_message(format, *args)

    def send_head(self):  # type: ignore[override]
        header = self.headers.get("Range")
        if not header:
            return super().send_head()
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "file not found")
            return None
        size = path.stat().st_size
        m = _RANGE.match(header.strip())
        if m is None:  # a form we do not serve: the whole file, as RFC 9110 allows
            return super().send_head()
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or end < start:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(body)

    def end_headers(self) -> None:
        if self.headers.get("Range") is None:
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()


def make_server(folder: str | Path, port: int, host: str = "0.0.0.0",
                quiet: bool = False) -> ThreadingHTTPServer:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    server = ThreadingHTTPServer((host, port), partial(RangeHandler, directory=str(folder)))
    server.quiet = quiet  # type: ignore[attr-defined]
    return server


def copy_key(public: str | Path, dest: str | Path) -> None:
    """Give a device the operator's public key (checked: an Ed25519 PEM public key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(public).read_bytes())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{public}: cannot read the release public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{public}: not an Ed25519 public key")
    shutil.copyfile(public, dest)
