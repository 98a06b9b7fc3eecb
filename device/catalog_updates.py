"""Catalog releases, the device's side: download, verify, apply in one transaction, re-embed.

The agent subscribes to its group's retained `storyscan/v1/<fleet>/groups/<group>/release/
catalog` (`storyscan fleet publish-catalog`, fleet/release.py), so a device that was offline
gets the latest release when it reconnects. Each release is handled on a worker thread of its
own (scans keep flowing) and acked on the device's `ack` topic (`"command":
"release-catalog"`), ok or with the reason it was refused:

1. version: catalog releases are numbered 1, 2, 3, ...; one not newer than the last applied
   (`release_version` in the catalog's `meta`) is refused. The release applied last, announced
   again (the retained message on every reconnect and restart), is ignored quietly: its
   archive's sha256 is `release_sha256` in `meta`.
2. download and verify with model releases' functions (device/updates.py): resume with HTTP
   Range, size and sha256 of the archive, plain files only, the operator's Ed25519 signature
   over manifest.json (the public key given at provisioning, `release_key`).
3. the manifest: a catalog one (`"kind": "catalog"`) of the announced version; every file's size
   and sha256 as it lists them; every product well formed, its photos files of the archive.
4. apply: `Catalog.apply_release`: products upserted (stories, prices, attributes, photos copied
   into the catalog's media folder), removed SKUs deleted with their stories and embeddings,
   the release's version and sha256 recorded, the catalog's own `version` bumped, all in one
   SQLite transaction; any failure leaves the catalog as it was.
5. embeddings: the changed products' reference embeddings are gone with the old rows. In the
   kiosk's process the kiosk embeds the new photos and rebuilds its matcher on its own thread
   (`Kiosk.reload_catalog`) before the ack; standalone, the kiosk embeds them when it next
   starts (Pipeline.open embeds every photo its model has not seen).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from device.catalog import Catalog, CatalogError, Product
from device.sync import Agent, Result, catalog_meta, group_topic
from device.updates import (
    ReleaseRefused,
    fetched,
    read_release,
    require_fields,
    unpack,
    verify_signature,
)
from models.bundle import sha256_file

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

log = logging.getLogger("storyscan.catalog_updates")

RELEASE_COMMAND = "release-catalog"


def read_manifest(manifest: dict, version: int, folder: Path) -> tuple[list[Product], list[str]]:
    """The products and removals of a verified catalog manifest whose files were unpacked into
    `folder`; ReleaseRefused names the first thing wrong."""
    if manifest.get("kind") != "catalog":
        raise ReleaseRefused("the archive is not a catalog release")
    if manifest.get("version") != version:
        raise ReleaseRefused(f"the manifest says version {manifest.get('version')!r}, the "
                             f"release {version!r}")
    files, products, remove = (manifest.get(k) for k in ("files", "products", "remove"))
    if not (isinstance(files, dict) and isinstance(products, list) and isinstance(remove, list)):
        raise ReleaseRefused("the manifest lacks 'files', 'products' or 'remove'")
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict) or not path.is_file():
            raise ReleaseRefused(f"file {name!r} is listed but not in the archive")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise ReleaseRefused(f"file {name!r} does not match its size and sha256 in the "
                                 "manifest")
    try:
        parsed = [Product.from_dict(p) for p in products]
    except CatalogError as e:
        raise ReleaseRefused(f"manifest: {e}") from None
    for p in parsed:
        missing = [i for i in p.images if i not in files]
        if missing:
            raise ReleaseRefused(f"product {p.sku}: photo {missing[0]!r} is not a file of the "
                                 "release")
    return parsed, remove


class CatalogUpdater:
    """Plugs into an Agent: the group's `release/catalog` topic."""

    def __init__(self, agent: Agent, timeout_s: float = 60.0) -> None:
        self.agent, self.config, self.timeout_s = agent, agent.config, timeout_s
        releases = self.config.path_of("releases", "releases")
        assert releases is not None
        self.staging = releases / "staging"
        kiosk = agent.kiosk
        self.catalog = kiosk.pipeline.catalog.path if kiosk is not None \
            else self.config.path_of("catalog")
        meta = catalog_meta(self.catalog)
        version = meta.get("release_version", "")
        # the release applied last: version (reported in status) and archive sha256
        self.applied: int | None = int(version) if version.isdecimal() else None
        self.applied_sha = meta.get("release_sha256")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="catalog-release")
        self._busy: set[str] = set()  # sha256 of releases being handled
        self._seen: set[str] = set()  # refused for good by this process
        self.topic = group_topic(self.config.fleet, self.config.group, "release/catalog")
        agent.add_route(self.topic, self.on_message)

    # --- the agent's thread --------------------------------------------------------------------

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        release, problem = read_release(message)
        if problem:
            self.agent._ack(None, RELEASE_COMMAND,
                            Result(False, f"unreadable catalog release message ({problem})"))
        if release is None:
            return
        sha = release["sha256"]
        if sha in self._busy or sha in self._seen or sha == self.applied_sha:
            return
        self._busy.add(sha)
        future = self._pool.submit(self.apply, release)
        future.add_done_callback(lambda _f: self._busy.discard(sha))
        self.agent.ack_when_done(None, RELEASE_COMMAND, future)

    # --- the worker thread ---------------------------------------------------------------------

    def apply(self, release: dict) -> Result:
        """Everything from the version check to the re-embedding; a Result either way."""
        version = release.get("version")
        try:
            return self._apply(release)
        except (ReleaseRefused, CatalogError) as e:
            log.warning("catalog release %s refused: %s", version, e)
            return Result(False, f"catalog release {version} refused: {e}",
                          {"version": version, "refused": str(e)})
        except Exception as e:
            log.exception("catalog release %s failed", version)
            return Result(False, f"catalog release {version} refused: {type(e).__name__}: {e}",
                          {"version": version, "refused": str(e)})

    def _apply(self, release: dict) -> Result:
        require_fields(release, version=int)
        version, sha = release["version"], release["sha256"]
        if self.catalog is None:
            raise ReleaseRefused("the device config names no catalog (paths.catalog)")
        if version <= (self.applied or 0):
            self._seen.add(sha)
            raise ReleaseRefused(f"version {version} is not newer than the applied "
                                 f"{self.applied}")
        with fetched(release, self.config, self.staging, self.timeout_s) as (public, archive,
                                                                               stage):
            manifest = verify_signature(public, release["signature"], unpack(archive, stage))
            products, remove = read_manifest(manifest, version, stage)
            catalog = Catalog(self.catalog)
            try:
                catalog_version = catalog.apply_release(version, products, remove, stage, sha)
            finally:
                catalog.db.close()
        self.applied_sha, self.applied = sha, version
        photos = sum(len(p.images) for p in products)
        done = (f"catalog release {version} applied: {len(products)} products added or "
                f"updated, {len(remove)} SKUs removed (catalog version {catalog_version})")
        data = {"version": version, "catalog_version": catalog_version,
                "products": len(products), "removed": len(remove)}
        kiosk = self.agent.kiosk
        if kiosk is None:
            return Result(True, f"{done}; the kiosk embeds its {photos} new reference photos "
                                "when it next starts", data)
        try:
            embedded = kiosk.reload_catalog().result(timeout=self.timeout_s * 5)
        except Exception as e:
            return Result(False, f"{done}, but the kiosk could not reload it ({e}); it embeds "
                                 "the new photos when it restarts", data)
        return Result(True, f"{done}; {embedded} reference photos embedded and loaded by the "
                            "kiosk", data | {"embedded": embedded})

    def close(self) -> None:
        """Stop taking releases; one in progress finishes on its own (it is one transaction)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
