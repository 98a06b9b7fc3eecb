"""Staged model rollouts: a canary share of a group first, then wider waves, halted on failures.

A model release is one retained message on the group's `release/model` topic (fleet/release.py).
A staged rollout adds `"rollout": {"id", "wave", "waves", "targets": [devices]}` to it: a
device installs the release only when it is named in `targets` (device/updates.py), so the
controller widens a rollout by republishing the same retained message with more devices named,
and the last wave drops `targets` so the whole group, devices never seen included, takes it.

    storyscan fleet publish-model BUNDLE --group store-12 --canary 10% ...  # wave 1 goes out
    storyscan fleet controller ...        # advances the waves as the devices' acks come in
    storyscan fleet status                # devices, and each rollout's wave and counts

Each wave is a cumulative share of the group's devices (`--waves 10,50,100`; `--canary 10%`
is the same as `--waves 10,50,100`), taken in an order fixed per rollout (online devices
first, then a hash of rollout id and device name, so each rollout picks different canaries),
at least one device. The controller (Controller.advance_rollouts, every few seconds) counts,
over the devices targeted so far:

- installed: the device acked `release-model` ok for this version, or its status reports the
  release's model key;
- failed: its latest ack for this version says it refused or failed (bad download, self-test);
- pending: neither yet (offline devices wait here: a wave waits for them).

When `installed >= advance_at x targeted` it publishes the next wave; when `failed >= halt_at x
targeted` (and at least one failed) it halts: the message is republished with `halted: true`,
so no device not on it yet installs it, and the rollout stays halted; devices that installed
keep it (`storyscan fleet command DEVICE rollback` takes it back). A rollout is done when every
device of the group runs it. Publishing a new release to the group supersedes an unfinished one.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from device.sync import ConfigError
from fleet.db import FleetDB, now_iso

ADVANCE_AT = 0.9
HALT_AT = 0.2


def parse_waves(canary: str | None, waves: str | None) -> list[float]:
    """Cumulative shares in (0, 1], ascending, ending at 1.0. `--canary 10%` alone gives
    [0.1, 0.5, 1.0]; neither gives one wave, the whole group at once."""

    def share(text: str) -> float:
        try:
            value = float(text.strip().rstrip("%")) / 100
        except ValueError:
            raise ConfigError(f"{text!r}: not a percentage") from None
        if not 0 < value <= 1:
            raise ConfigError(f"{text!r}: a share of the group must be in (0, 100]%")
        return value

    out = [share(w) for w in waves.split(",") if w.strip()] if waves else []
    if canary:
        first = share(canary)
        out = [first, *[w for w in out if w > first]] if out else [first, max(first, 0.5)]
    if not out or out[-1] != 1.0:
        out.append(1.0)
    out = sorted(set(out))
    return out


@dataclass
class Tally:
    targeted: list[str]
    installed: set[str]
    failed: dict[str, str]  # device -> reason

    @property
    def pending(self) -> list[str]:
        return [d for d in self.targeted if d not in self.installed and d not in self.failed]


def wave_order(rollout_id: str, devices: list[dict]) -> list[str]:
    """The order devices join a rollout: online ones first, then by a per-rollout hash."""
    return [d["device"] for d in sorted(devices, key=lambda d: (
        d["state"] != "online",
        hashlib.sha256(f"{rollout_id}/{d['device']}".encode()).hexdigest()))]


def wave_targets(rollout_id: str, devices: list[dict], share: float,
                 before: list[str]) -> list[str] | None:
    """The devices named by a wave of `share`: those of earlier waves plus the next ones in
    order, at least one; None for the last wave (the whole group)."""
    if share >= 1.0:
        return None
    order = [d for d in wave_order(rollout_id, devices) if d not in before]
    want = max(1, math.ceil(share * len(devices)))
    return [*before, *order[:max(0, want - len(before))]]


def tally(db: FleetDB, rollout: dict, devices: list[dict]) -> Tally:
    targets = json.loads(rollout["targets"]) if rollout["targets"] else None
    targeted = targets if targets is not None else [d["device"] for d in devices]
    installed = {d["device"] for d in devices if d["model"] == rollout["model"]}
    failed: dict[str, str] = {}
    for ack in db.release_acks(rollout["fleet"], rollout["started"]):
        data = json.loads(ack["data"]) if ack["data"] else {}
        if str(data.get("version")) != rollout["version"]:
            continue
        if ack["ok"]:
            installed.add(ack["device"])
            failed.pop(ack["device"], None)
        elif ack["device"] not in installed:
            failed[ack["device"]] = ack["message"] or "failed"
    return Tally(targeted, installed & set(targeted), {d: r for d, r in failed.items()
                                                       if d in targeted})


def message(rollout: dict, targets: list[str] | None, wave: int, halted: bool = False) -> dict:
    """The retained release message for wave `wave` (0-based) of `rollout`."""
    waves = json.loads(rollout["waves"])
    body = json.loads(rollout["message"])
    body["rollout"] = {"id": rollout["id"], "wave": wave + 1, "waves": len(waves),
                       "halted": halted, **({"targets": targets} if targets is not None else {})}
    return body


def start(db: FleetDB, fleet: str, group: str, release: dict, topic: str, waves: list[float],
          advance_at: float = ADVANCE_AT, halt_at: float = HALT_AT) -> tuple[dict, dict]:
    """Record a rollout and return (rollout row, the first wave's message to publish). A
    staged rollout needs the group's devices in the fleet database (the controller records
    them as they come online)."""
    rollout_id = uuid.uuid4().hex[:12]
    devices = db.group_devices(fleet, group)
    if len(waves) > 1 and not devices:
        raise ConfigError(f"no device of group {group!r} in the fleet database yet: a staged "
                          "rollout picks its canaries from the devices the controller has "
                          "heard (run 'storyscan fleet controller')")
    targets = wave_targets(rollout_id, devices, waves[0], [])
    now = now_iso()
    rollout = {"id": rollout_id, "fleet": fleet, "grp": group, "version": str(release["version"]),
               "model": release["key"], "topic": topic,
               "message": json.dumps(release, separators=(",", ":")),
               "waves": json.dumps(waves), "advance_at": advance_at, "halt_at": halt_at,
               "wave": 0, "targets": None if targets is None else json.dumps(targets),
               "state": "rolling", "reason": None, "started": now, "updated": now}
    db.add_rollout(rollout)
    return rollout, message(rollout, targets, 0)


def advance(db: FleetDB, publish: Callable[[str, dict], bool]) -> list[str]:
    """One look at every rolling rollout: halt, widen or finish it. `publish(topic, message)`
    sends a retained message and says whether the broker took it; nothing is recorded as
    done until it did. Returns what happened, one line each, for the log."""
    events = []
    for r in db.rollouts(state="rolling"):
        devices = db.group_devices(r["fleet"], r["grp"])
        t = tally(db, r, devices)
        waves = json.loads(r["waves"])
        wave = r["wave"]
        targets = json.loads(r["targets"]) if r["targets"] else None
        n = len(t.targeted)
        where = f"rollout {r['id']} ({r['grp']} -> {r['version']}), wave {wave + 1}/{len(waves)}"
        if t.failed and len(t.failed) >= r["halt_at"] * n:
            device, reason = next(iter(t.failed.items()))
            why = f"{len(t.failed)} of {n} devices failed ({device}: {reason})"
            if publish(r["topic"], message(r, targets, wave, halted=True)):
                db.update_rollout(r["id"], state="halted", reason=why)
                events.append(f"{where}: halted: {why}")
        elif n and len(t.installed) >= r["advance_at"] * n:
            if wave + 1 < len(waves):
                wider = wave_targets(r["id"], devices, waves[wave + 1], targets or [])
                if publish(r["topic"], message(r, wider, wave + 1)):
                    db.update_rollout(r["id"], wave=wave + 1,
                                      targets=None if wider is None else json.dumps(wider))
                    events.append(f"{where}: {len(t.installed)} of {n} installed; wave "
                                  f"{wave + 2} out to "
                                  f"{'the whole group' if wider is None else len(wider)}")
            elif len(t.installed) == len(devices):
                db.update_rollout(r["id"], state="done",
                                  reason=f"{len(devices)} devices run it")
                events.append(f"{where}: done, {len(devices)} devices")
    return events


def summary(db: FleetDB, fleet: str | None = None, limit: int = 10) -> list[dict]:
    """What `storyscan fleet status` shows: each rollout's wave and counts, newest first."""
    out = []
    for r in db.rollouts(fleet)[:limit]:
        t = tally(db, r, db.group_devices(r["fleet"], r["grp"]))
        out.append({"rollout": r["id"], "group": r["grp"], "version": r["version"],
                    "state": r["state"],
                    "wave": f"{r['wave'] + 1}/{len(json.loads(r['waves']))}",
                    "targeted": len(t.targeted), "installed": len(t.installed),
                    "failed": len(t.failed), "pending": len(t.pending),
                    "started": r["started"], "reason": r["reason"]})
    return out
