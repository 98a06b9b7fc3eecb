"""The fleet at scale on loopback: 100 simulated kiosks, a private mosquitto, the controller.

    python bench/fleet.py                            # builds a small demo model first (~2 min)
    python bench/fleet.py --work /tmp/fleetbench     # ... kept there and reused next time
    python bench/fleet.py --devices 100 --scans 1000 --waves 10,50,100

What is real: the broker is `mosquitto` with the password file and ACL that `storyscan
provision` wrote for every kiosk and the controller (plain TCP on loopback: TLS is tested in
tests/test_fleet.py, not timed here); the controller is a `storyscan fleet controller` process
with its SQLite fleet database; each kiosk is a full device agent (device/sync.py: its own MQTT
connection, SQLite outbox and scan log, model updater) on threads of worker processes, standalone
(reading its scan log, as the `storyscan agent` unit does); releases are signed archives served
by `fleet.release.make_server` and installed with download, signature check and self-test.
What is simulated: the kiosks' scans (rows written into each scan log) and their cameras.

Measured:
1. ingest, two ways: (a) end to end: every kiosk records `--scans` scans at once (one
   transaction per kiosk, as after an outage); time from the first write until the
   controller's database holds all of them (scan log -> agent -> outbox -> broker ->
   controller -> committed; the burst's own writing time is part of it); (b) the controller
   catching up: it is stopped, the kiosks send a second burst, which the broker queues on the
   controller's persistent session; the controller is started again and its ingest rate is
   timed from the first of those scans stored to the last.
2. rollout: a new model version published with `--waves` (storyscan fleet publish-model
   --waves): time until each wave's devices acked it (as the controller's database shows),
   and until the rollout is done; then the next version to the whole group at once, the
   alternative, timed the same way. The controller looks at rollouts every 2 s, so each wave
   waits up to 2 s by design.
3. memory: peak resident memory of the broker and the controller processes (sampled every
   0.2 s), and of this process with its agents.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import add_docs_args, write_docs  # noqa: E402
from bench.ui_load import build_demo  # noqa: E402
from models.tables import format_markdown_table, format_table  # noqa: E402

FLEET, GROUP = "bench", "floor"
FORMATS = {"peak MiB": ".0f", "s since publish": ".1f", "s": ".1f", "events/s": ".0f",
           "vs all at once": ".2f"}
AGENT = {"telemetry_every_s": 10.0, "poll_s": 0.2, "reconnect_min_s": 0.2,
         "reconnect_max_s": 2.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str, every: float = 0.1) -> float:
    """Seconds until `predicate()` held; SystemExit after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - t0


class PeakMemory:
    """Peak RSS of some processes, sampled on a thread."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs, self.peak = procs, dict.fromkeys(procs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, p in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)

    def add(self, name: str, proc: psutil.Process) -> None:
        self.peak[name] = 0
        self.procs = {**self.procs, name: proc}

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: v / 2**20 for k, v in self.peak.items()}


def run_agents(configs: list[str], stop) -> None:
    """A worker process: one standalone device agent per config until `stop` is set. Agents
    are spread over processes because paho's network loop uses select(), which cannot watch
    descriptors above 1023, and each agent holds a dozen (sockets, SQLite files, locks)."""
    from device.sync import Agent, DeviceConfig

    agents = [Agent(DeviceConfig.load(c)).start() for c in configs]
    stop.wait()
    for a in agents:
        a.stop()


def burst(logs: list, n: int, start: int) -> None:
    """`n` scans on every kiosk's scan log, one transaction per kiosk."""
    for i, log in enumerate(logs):
        rows = [(f"2026-11-25T{(start + s) // 3600 % 24:02d}:{(start + s) // 60 % 60:02d}:"
                 f"{(start + s) % 60:02d}.000Z", f"SKU-{(i + s) % 12}",
                 f"product {(i + s) % 12}", 0.9, 0.8, 0, 12.0, "shopper", "v4l2:0",
                 "bench@1", 1) for s in range(n)]
        with log.db.conn:
            log.db.conn.executemany(
                "INSERT INTO scans (time, sku, name, confidence, similarity, unknown, "
                "latency_ms, mode, source, model, catalog_version) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as c:
        return c.execute(sql, params).fetchall()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--scans", type=int, default=1000, help="scans per kiosk in the burst")
    p.add_argument("--waves", default="10,50,100", help="rollout waves, %% of the group")
    p.add_argument("--processes", type=int, default=4, help="processes the agents run in")
    p.add_argument("--work", type=Path, help="where to build (and keep) the demo model")
    add_docs_args(p)
    args = p.parse_args()

    from device.scans import ScanLog
    from device.sync import BrokerSettings
    from fleet import rollout
    from fleet.db import FleetDB
    from fleet.release import keygen, load_private_key, make_release, make_server, publish
    from models.bundle import MANIFEST
    from provisioning.provision import broker_config, provision_controller, provision_device

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(exe, os.X_OK):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    work = args.work or Path(tempfile.mkdtemp(prefix="fleetbench-model-"))
    bundle_v1, _, _ = build_demo(work)
    waves = rollout.parse_waves(None, args.waves)

    with tempfile.TemporaryDirectory(prefix="fleetbench-") as tmp:
        root = Path(tmp)
        # the operator's side: keys, provisioning, the broker's files
        keygen(root / "keys")
        out, ca = root / "provisioned", root / "ca"
        names = [f"kiosk-{i:03d}" for i in range(args.devices)]
        t0 = time.monotonic()
        kiosks = {name: provision_device(name, FLEET, GROUP, out, "127.0.0.1:8883", ca,
                                         release_key=root / "keys" / "release.pub")
                  for name in names}
        ops = provision_controller("ops", FLEET, out, "127.0.0.1:8883", ca)
        print(f"provisioned {args.devices} kiosks in {time.monotonic() - t0:.1f} s", flush=True)

        port = free_port()
        (root / "persist").mkdir()
        conf = broker_config(port, etc=out / "broker", tls=False,
                             persistence_dir=root / "persist", fleet=FLEET, bind="127.0.0.1")
        conf += "user root\n" if os.geteuid() == 0 else ""
        conf += f"max_connections -1\nlog_dest file {root / 'mosquitto.log'}\n"
        (root / "mosquitto.conf").write_text(conf)
        broker = subprocess.Popen([exe, "-c", str(root / "mosquitto.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=0.2):
                return True
            return False

        wait(listening, 10, "mosquitto")
        artifacts = root / "artifacts"
        artifacts.mkdir()
        http = make_server(artifacts, 0, "127.0.0.1", quiet=True)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{http.server_address[1]}"

        ctl = ops.folder / "controller.json"
        data = json.loads(ops.config.read_text())
        data["broker"] |= {"port": port, "tls": None}
        ctl.write_text(json.dumps(data))
        fleet_db = root / "fleet.db"

        def start_controller() -> subprocess.Popen:
            with open(root / "controller.log", "a") as controller_log:
                return subprocess.Popen(
                    [str(Path(sys.executable).with_name("storyscan")), "fleet", "controller",
                     "--config", str(ctl), "--db", str(fleet_db), "--log-level", "WARNING"],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=controller_log)

        controller = start_controller()
        procs: list[mp.Process] = []
        logs = []
        stop = mp.get_context("spawn").Event()
        memory = None
        try:
            wait(fleet_db.is_file, 30, "the controller's database")
            configs = []
            for name in names:
                folder = kiosks[name].folder
                config = json.loads((folder / "device.json").read_text())
                where = root / "kiosks" / name
                where.mkdir(parents=True)
                config["broker"] |= {"port": port, "tls": None}
                config["paths"] = {"scans": str(where / "scans.db"),
                                   "outbox": str(where / "outbox.db"),
                                   "catalog": str(where / "catalog.db"),
                                   "bundle": str(bundle_v1), "releases": str(where / "rel")}
                config["agent"] |= AGENT
                (folder / "device.json").write_text(json.dumps(config, indent=2))
                logs.append(ScanLog(where / "scans.db"))
                configs.append(str(folder / "device.json"))
            spawn = mp.get_context("spawn")
            procs = [spawn.Process(target=run_agents, args=(configs[i::args.processes], stop))
                     for i in range(args.processes)]
            for proc in procs:
                proc.start()
            memory = PeakMemory({"broker": psutil.Process(broker.pid),
                                 "controller": psutil.Process(controller.pid),
                                 **{f"agents {i}": psutil.Process(proc.pid)
                                    for i, proc in enumerate(procs)}})
            try:
                online = wait(lambda: query(fleet_db, "SELECT count(*) FROM devices WHERE "
                                            "state = 'online'")[0][0] == args.devices, 120,
                              "every kiosk online", every=0.2)
            except SystemExit:
                print((root / "controller.log").read_text()[-2000:],
                      (root / "mosquitto.log").read_text()[-3000:], query(
                    fleet_db, "SELECT state, count(*) FROM devices GROUP BY state"))
                raise
            print(f"{args.devices} kiosks online after {online:.1f} s", flush=True)

            # 1a. end to end: a burst of scans on every kiosk while everything runs
            total = args.devices * args.scans
            t0 = time.monotonic()
            burst(logs, args.scans, 0)
            written = time.monotonic() - t0
            stored_all = ("SELECT count(*) FROM scans",)
            e2e = written + wait(lambda: query(fleet_db, *stored_all)[0][0] >= total, 600,
                                 f"{total} scans at the controller", every=0.05)
            print(f"end to end: {total} scans in {e2e:.2f} s", flush=True)

            # 1b. the controller catching up: down while the kiosks send a second burst
            controller.terminate()
            controller.wait(30)
            burst(logs, args.scans, args.scans)
            outboxes = [Path(json.loads(Path(c).read_text())["paths"]["outbox"])
                        for c in configs]
            wait(lambda: all(query(o, "SELECT count(*) FROM outbox WHERE kind = 'scan'")[0][0]
                             == 0 for o in outboxes), 600, "every outbox sent to the broker",
                 every=0.5)
            controller = start_controller()
            memory.add("controller (restarted)", psutil.Process(controller.pid))
            wait(lambda: query(fleet_db, *stored_all)[0][0] > total, 120,
                 "the first queued scan stored", every=0.01)
            t1, n1 = time.monotonic(), query(fleet_db, *stored_all)[0][0]
            drain = wait(lambda: query(fleet_db, *stored_all)[0][0] >= 2 * total, 600,
                         f"{2 * total} scans at the controller", every=0.05)
            catch_up = (2 * total - n1) / max(time.monotonic() - t1, 1e-9)
            stored = query(fleet_db, "SELECT count(*), count(DISTINCT device) FROM scans")[0]
            print(f"catch-up: the controller stored {2 * total - n1} queued scans in "
                  f"{drain:.2f} s", flush=True)

            # 2. a staged rollout of the next version, then the one after it all at once
            settings = BrokerSettings.from_config(data["broker"], ops.folder)
            key = load_private_key(root / "keys" / "release.key")
            wave_rows: list[dict] = []
            timings = {}
            for n, plan in ((1, waves), (2, [1.0])):
                bundle = root / f"v{n + 1}"
                shutil.copytree(bundle_v1, bundle)
                manifest = json.loads((bundle / MANIFEST).read_text())
                version = manifest["version"] = f"{manifest['version']}.{n}"
                (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                release = make_release(bundle, artifacts, url, key, FLEET, GROUP)
                db = FleetDB(fleet_db)
                row, message = rollout.start(db, FLEET, GROUP, release.message, release.topic,
                                             plan)
                db.close()
                installed = ("SELECT count(DISTINCT device) FROM acks WHERE command = "
                             "'release-model' AND ok = 1 AND data LIKE ?", (f'%"{version}"%',))
                t0 = time.monotonic()
                publish(settings, FLEET, release.topic, message, client_name="ops")
                for w, share in enumerate(plan):
                    need = max(1, math.ceil(share * args.devices))
                    wait(lambda need=need, q=installed: query(fleet_db, *q)[0][0] >= need, 900,
                         f"{need} kiosks on {version}", every=0.1)
                    took = time.monotonic() - t0
                    if len(plan) > 1:
                        wave_rows.append({"wave": f"{w + 1} ({share:.0%})",
                                          "kiosks on it": need, "s since publish": took})
                    print(f"{version}: {need} kiosks acked it {took:.1f} s after publishing",
                          flush=True)
                wait(lambda row=row: query(fleet_db, "SELECT state FROM rollouts WHERE id = ?",
                                           (row["id"],))[0][0] == "done", 60, "rollout done")
                timings[len(plan) > 1] = time.monotonic() - t0
            failed = query(fleet_db, "SELECT count(*) FROM acks WHERE command = "
                           "'release-model' AND ok = 0")[0][0]
        finally:
            stop.set()
            for proc in procs:
                proc.join(60)
            peaks = memory.stop() if memory is not None else {}
            controller.terminate()
            controller.wait(30)
            broker.terminate()
            broker.wait(30)
            http.shutdown()

    size = release.message["size"] / 2**20
    ingest_rows = [{"phase": "end to end: burst while all run", "kiosks": args.devices,
                    "scans": total, "s": e2e, "events/s": total / e2e},
                   {"phase": "controller catching up after being down", "kiosks": args.devices,
                    "scans": 2 * total - n1, "s": drain, "events/s": catch_up}]
    memory_rows = [{"process": "mosquitto (broker)", "peak MiB": peaks["broker"]},
                   {"process": "storyscan fleet controller",
                    "peak MiB": max(peaks["controller"], peaks["controller (restarted)"])},
                   {"process": f"{args.devices} device agents ({args.processes} processes, "
                               "together)",
                    "peak MiB": sum(v for k, v in peaks.items() if k.startswith("agents"))}]
    wave_rows.append({"wave": "rollout done (controller)", "kiosks on it": args.devices,
                      "s since publish": timings[True]})
    compare = [{"release to the whole group": f"in waves {args.waves}%", "s": timings[True],
                "vs all at once": timings[True] / timings[False]},
               {"release to the whole group": "all at once", "s": timings[False],
                "vs all at once": 1.0}]
    tables = [
        (f"1. Ingest: {args.scans} scans on every kiosk at once, until all are stored by the "
         f"controller ({stored[0]} stored from {stored[1]} kiosks, each once)", ingest_rows,
         list(ingest_rows[0])),
        (f"2. Staged rollout of a {size:.1f} MiB model release, waves {args.waves}% "
         f"({failed} failures)", wave_rows, ["wave", "kiosks on it", "s since publish"]),
        ("2b. The same fleet, the next release all at once: what the waves cost", compare,
         list(compare[0])),
        ("3. Peak resident memory", memory_rows, ["process", "peak MiB"]),
    ]
    for title, rows, cols in tables:
        print(f"\n{title}\n{format_table(rows, cols, FORMATS)}")
    if args.no_docs:
        return
    body = (f"{args.devices} simulated kiosks (full device agents, standalone, on threads of "
            f"{args.processes} worker processes), a private mosquitto with the provisioned "
            "passwords and ACLs (plain TCP on loopback), `storyscan fleet controller` into "
            "SQLite, everything on this machine's cores at once. Each kiosk downloads the "
            "release over HTTP from `fleet.release.make_server`, checks size, sha256 and "
            "signature, unpacks and self-tests it (ONNX Runtime on its golden inputs) before "
            "switching; the controller looks at the rollout every 2 s. Here all kiosks share "
            "the same cores, so a release to all at once makes 100 self-tests compete for "
            "them; on a real fleet each kiosk has its own.\n\n"
            + "\n\n".join(f"**{t}**\n\n{format_markdown_table(r, c, FORMATS)}"
                          for t, r, c in tables))
    write_docs(args, "fleet", "Fleet: 100 kiosks on loopback", body)


if __name__ == "__main__":
    main()
