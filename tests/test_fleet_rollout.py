"""Staged rollouts end to end: `storyscan fleet publish-model --canary`, the controller advancing
waves as acks come in (fleet/rollout.py), and a rollout halted when its canary fails; real
broker, real HTTP, real device agents installing signed bundles."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.sync import Agent
from fleet.controller import Controller
from fleet.db import FleetDB
from fleet.rollout import parse_waves, wave_targets
from tests.conftest import TrainedDemo, storyscan
from tests.test_fleet import FLEET, controller_settings, wait_for
from tests.test_fleet_release import (
    Acks,
    Env,
    device,
    release_env,
    running_version,
    variant,
)

GROUP = [f"w{i}" for i in range(1, 6)]


def test_waves_are_parsed_and_grow() -> None:
    assert parse_waves("10%", None) == [0.1, 0.5, 1.0]
    assert parse_waves(None, "20,60") == [0.2, 0.6, 1.0]
    assert parse_waves("20", "10,50,100") == [0.2, 0.5, 1.0]
    assert parse_waves(None, None) == [1.0]
    with pytest.raises(ValueError, match="must be in"):
        parse_waves("0%", None)
    devices = [{"device": f"d{i}", "state": "online" if i % 2 else "offline"}
               for i in range(10)]
    first = wave_targets("r", devices, 0.1, [])
    assert first is not None and len(first) == 1 and first[0] in {"d1", "d3", "d5", "d7", "d9"}
    second = wave_targets("r", devices, 0.5, first)
    assert second is not None and second[0] == first[0] and len(second) == 5
    assert all(d["state"] == "online" for d in devices if d["device"] in second)
    assert wave_targets("r", devices, 1.0, second) is None  # the whole group
    assert wave_targets("r", devices, 0.01, []) is not None  # at least one device


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with release_env(tmp_path_factory.mktemp("rollout"), dict.fromkeys(GROUP, "w")) as e:
        yield e


def _controller_json(env: Env, where: Path) -> Path:
    path = where / "controller.json"
    data = json.loads(env.fleet.controller.config.read_text())
    data["broker"] |= {"port": env.broker.port, "tls": None}
    path.write_text(json.dumps(data))
    return path


def test_a_canary_then_waves_then_a_halted_rollout(env: Env, trained_demo: TrainedDemo,
                                                    tmp_path: Path) -> None:
    base = tmp_path / "bundles"
    v1 = trained_demo.bundle
    v2 = variant(v1, base / "v2", "2")
    db_path = tmp_path / "fleet.db"
    controller = Controller(controller_settings(env.fleet, env.broker), FLEET, FleetDB(db_path),
                            name="ops", reconnect=(0.1, 0.5), rollout_every_s=0.3).start()
    configs = {d: device(env, d, v1, tmp_path / d) for d in GROUP}
    agents = [Agent(c).start() for c in configs.values()]
    acks = Acks(env)
    ctl = _controller_json(env, tmp_path)
    publish = ("fleet", "publish-model", "--group", "w", "--artifacts", env.artifacts,
               "--url-base", env.url, "--key", env.keys / "release.key", "--config", ctl,
               "--db", db_path)
    try:
        wait_for(lambda: sum(d["state"] == "online" for d in
                             controller.db.group_devices(FLEET, "w")) == 5, 30,
                 "five devices online", env.broker.log)

        # version 2: one canary (20%), then 60%, then everyone
        r = storyscan(*publish[:2], v2, *publish[2:], "--canary", "20%", "--waves", "20,60,100")
        assert r.returncode == 0, r.stderr
        assert "wave 1 of 3 to 1 device(s)" in r.stdout, r.stdout
        rollout_id = r.stdout.split("rollout ")[1].split(":")[0]
        wait_for(lambda: all(running_version(c) == "2" for c in configs.values()), 120,
                 "every device on version 2", lambda: json.dumps(
                     controller.db.rollouts(), indent=1))
        canary = r.stdout.split("to 1 device(s) (")[1].split(")")[0]
        arrival = [a["device"] for a in acks.events
                   if a["command"] == "release-model" and a["ok"]]
        # the canary went first; the waves (1, then 3, then 5 devices) followed in turn
        assert arrival[0] == canary and sorted(arrival) == GROUP, arrival
        wait_for(lambda: controller.db.rollouts()[0]["state"] == "done", 60, "rollout done")
        r = storyscan("fleet", "status", "--db", db_path, "--json")
        rollout = json.loads(r.stdout)["rollouts"][0]
        assert rollout["rollout"] == rollout_id
        assert (rollout["state"], rollout["wave"], rollout["installed"], rollout["failed"]) \
            == ("done", "3/3", 5, 0), rollout

        # version 3 fails its self-test on the canary: the rollout halts, nobody else tries
        def break_golden(d: Path) -> None:
            import numpy as np

            np.save(d / "golden_embedding.npy", -np.load(d / "golden_embedding.npy"))

        v3 = variant(v1, base / "v3", "3", break_golden)
        before = {d: len(acks.of(d)) for d in GROUP}
        r = storyscan(*publish[:2], v3, *publish[2:], "--canary", "20%")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: controller.db.rollouts()[0]["state"] == "halted", 60,
                 "the rollout halted", lambda: json.dumps(controller.db.rollouts(), indent=1))
        time.sleep(2.0)  # time for any device that (wrongly) took it to ack
        tried = [d for d in GROUP if len(acks.of(d)) > before[d]]
        assert len(tried) == 1, tried
        assert "self-test failed" in acks.of(tried[0])[-1]["message"]
        assert all(running_version(c) == "2" for c in configs.values())
        r = storyscan("fleet", "status", "--db", db_path)
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == [
            controller.db.rollouts()[0]["id"]])
        assert " halted " in line and "1 of 1 devices failed" in line, r.stdout
    finally:
        acks.close()
        for a in agents:
            a.stop()
        controller.stop()
        controller.db.close()
