"""Model and catalog releases, the operator's side: the release key, signed archives, the
retained release message and a static HTTP server for the archives.

Both kinds are one archive each: manifest.json, which pins every other file by size and sha256,
plus those files; the operator's Ed25519 signature over the exact bytes of manifest.json so
covers the whole archive.

- `keygen(out)`: the operator's Ed25519 key pair (`release.key`, PKCS#8 PEM, mode 0600, kept by
  the operator; `release.pub`, given to every device by `storyscan provision --release-key`).
- `pack(manifest, files, out)`: a deterministic tar (sorted names, mtime 0, owner 0, mode 0644,
  no compression: ONNX weights and JPEGs do not shrink) holding manifest.json and the files.
- `make_release(bundle, ...)`: a model bundle (models/bundle.py's manifest), checked, packed
  and signed; its message, for `release/model`: `{"v": 1, "kind": "model", "name", "version",
  "key", "url", "size", "sha256", "signature", "manifest"}` (signature base64; manifest as
  parsed JSON, for people: devices verify the bytes in the archive).
- `make_catalog_release(source, version, ...)`: a products file or folder (any format
  `storyscan catalog import` reads, device/importers.py) and SKUs to remove, as a catalog
  release for `release/catalog`: its manifest is `{"kind": "catalog", "version": N, "products":
  [{"sku", "name", "category", "price", "currency", "stories", "attributes", "images":
  [names]}], "remove": [skus], "files": {name: {"sha256", "bytes"}}}`, each reference photo
  under a plain name of its own (`<sku>-NN<suffix>`); its message is `{"v": 1, "kind":
  "catalog", "version", "url", "size", "sha256", "signature", "products", "images",
  "remove"}` (counts of products and photos, the SKUs removed). Versions are whole numbers,
  each release's above the last: a device refuses one not newer than the one it applied.
- `publish(...)`: the release message, retained (QoS 1), on
  `storyscan/v1/<fleet>/groups/<group>/release/<kind>`; a device that is offline gets it when
  it reconnects.
- `serve(folder, port)`: HTTP with Range requests (`bytes=a-`, `bytes=a-b`: 206), so a device
  resumes a broken download; any static host that honours Range does as well.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.sync import BrokerSettings, ConfigError, check_name, group_topic, username
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


def pack(manifest: bytes, files: dict[str, Path], out: str | Path) -> None:
    """manifest.json and `files` (archive name -> path), as a tar whose bytes depend on theirs
    alone."""
    def add(tar: tarfile.TarFile, name: str, size: int, data: BinaryIO) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
        info.uname = info.gname = ""
        tar.addfile(info, data)

    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, MANIFEST, len(manifest), io.BytesIO(manifest))
        for name in sorted(files):
            with open(files[name], "rb") as f:
                add(tar, name, files[name].stat().st_size, f)


@dataclass
class Release:
    topic: str
    message: dict
    archive: Path


def _release(kind: str, manifest: bytes, files: dict[str, Path], name: str,
             artifacts: str | Path, url_base: str, key: Ed25519PrivateKey, fleet: str,
             group: str, fields: dict) -> Release:
    """Pack and sign: the archive `name` in `artifacts` (written beside it, then renamed) and
    the message to publish on the group's `release/<kind>` (nothing is published here)."""
    check_name("group", group)
    artifacts = Path(artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    archive = artifacts / name
    tmp = artifacts / f".{name}.tmp"
    pack(manifest, files, tmp)
    os.replace(tmp, archive)
    message = {"v": 1, "kind": kind, **fields, "url": f"{url_base.rstrip('/')}/{name}",
               "size": archive.stat().st_size, "sha256": sha256_file(archive),
               "signature": base64.b64encode(key.sign(manifest)).decode(),
               "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Release(group_topic(fleet, group, f"release/{kind}"), message, archive)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def make_release(bundle: str | Path, artifacts: str | Path, url_base: str,
                 key: Ed25519PrivateKey, fleet: str, group: str) -> Release:
    """Verify the bundle, pack and sign it, put the archive in `artifacts`: the message to
    publish (nothing is published here)."""
    try:
        b = load_bundle(bundle)  # every file's hash checked before anything is signed
    except BundleError as e:
        raise ReleaseError(str(e)) from None
    manifest = (b.path / MANIFEST).read_bytes()
    if hashlib.sha256(manifest).hexdigest() != b.digest:
        raise ReleaseError(f"{b.path / MANIFEST} changed while it was being checked")
    return _release("model", manifest, {n: b.path / n for n in b.manifest["files"]},
                    f"{_safe(b.name)}-{_safe(b.version)}-{b.digest[:12]}.tar", artifacts,
                    url_base, key, fleet, group,
                    {"name": b.name, "version": b.version, "key": b.key,
                     "manifest": b.manifest})


def make_catalog_release(source: str | Path, version: int, artifacts: str | Path,
                         url_base: str, key: Ed25519PrivateKey, fleet: str, group: str,
                         remove: Iterable[str] = ()) -> Release:
    """The products in `source` (with their stories, prices, attributes and reference photos)
    and the SKUs to `remove`, as catalog release `version`: packed, signed, the archive in
    `artifacts`, the message to publish (nothing is published here)."""
    from device.catalog import CatalogError, check_skus
    from device.importers import read_products

    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ReleaseError(f"catalog version {version!r}: a whole number from 1, above the "
                           "last release's")
    remove = sorted(set(remove))
    try:
        products = read_products(source)
        check_skus([*(p.sku for p in products), *remove])
    except CatalogError as e:
        raise ReleaseError(str(e)) from None
    skus = [p.sku for p in products]
    twice = sorted({s for s in skus if skus.count(s) > 1})
    if twice:
        raise ReleaseError(f"{source}: SKUs listed twice: {', '.join(twice)}")
    both = sorted(set(skus) & set(remove))
    if both:
        raise ReleaseError(f"SKUs both in {source} and --remove: {', '.join(both)}")
    files: dict[str, Path] = {}
    records = []
    for p in products:
        names = []
        for i, image in enumerate(p.images):
            path = Path(image)
            if not path.is_file():
                raise ReleaseError(f"{path}: reference photo of {p.sku} not found")
            suffix = path.suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", path.suffix) \
                else ""
            names.append(f"{p.sku}-{i:02d}{suffix}")  # plain and unique: SKUs are plain
            files[names[-1]] = path
        records.append(asdict(replace(p, images=names)))
    manifest = json.dumps(
        {"kind": "catalog", "version": version, "products": records, "remove": remove,
         "files": {n: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                   for n, f in sorted(files.items())}},
        indent=2, ensure_ascii=False).encode() + b"\n"
    digest = hashlib.sha256(manifest).hexdigest()
    return _release("catalog", manifest, files, f"catalog-{version}-{digest[:12]}.tar",
                    artifacts, url_base, key, fleet, group,
                    {"version": version, "products": len(records), "images": len(files),
                     "remove": remove})


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
