"""The operator's side of the fleet: the controller that gathers what the kiosks report, and the
`storyscan fleet ...` commands (status, stats, controller, command).

Why a package of its own: this code runs on the operator's machine (a server or laptop beside
the broker), never on a kiosk and never on the training workstation. It is not `device/`
(nothing here belongs on a Jetson, and the kiosk should not carry a database client for
PostgreSQL) nor `trainer/` (no torch), and not `provisioning/` either: provisioning is run once
per device to write files, while the controller is a long-running service with its own
database. Both sides share one definition of the wire protocol, the device's: topics, names and
broker settings come from device/sync.py, so the two cannot drift apart.

- fleet/db.py: the fleet database, SQLite by default or PostgreSQL given a `postgresql://` URL;
  every event is stored once per (fleet, device, seq).
- fleet/controller.py: the ingest loop (MQTT 5, persistent session, each message acknowledged
  only after it is committed).
- fleet/release.py: model and catalog releases: the operator's Ed25519 key, signed archives,
  the retained release messages, and an HTTP server with Range requests for the archives.
- fleet/rollout.py: staged model rollouts: canary and waves, advanced by the controller as
  acks come in, halted on failures.
- fleet/cli.py: `storyscan fleet controller|status|stats|command|keygen|publish-model|
  publish-catalog|serve`.
"""
