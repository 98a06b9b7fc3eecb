"""`storyscan provision`: the files a device and the broker get (the broker accepting them is
tested with a real mosquitto in tests/test_fleet.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from device.sync import DeviceConfig
from provisioning.provision import (
    ProvisionError,
    check_password_entry,
    mosquitto_password_entry,
    provision_controller,
    provision_device,
    replace_acl_block,
)
from tests.conftest import storyscan


def test_password_entry_is_mosquitto_passwd_format(tmp_path: Path) -> None:
    entry = mosquitto_password_entry("acme.k1", "s3cret", salt=b"0123456789ab")
    user, _, hashed = entry.partition(":")
    assert user == "acme.k1"
    _, algo, iterations, salt, digest = hashed.split("$")
    assert (algo, iterations, salt) == ("7", "101", "MDEyMzQ1Njc4OWFi")
    assert len(digest) == 88  # base64 of a 64-byte SHA-512 digest
    assert check_password_entry(entry, "s3cret") and not check_password_entry(entry, "s3cre")
    # mosquitto_passwd's own line checks out with the same algorithm
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed (Debian package mosquitto)")
    subprocess.run([tool, "-b", "-c", str(tmp_path / "pw"), "acme.k1", "s3cret"], check=True,
                   capture_output=True)
    theirs = (tmp_path / "pw").read_text().strip()
    assert theirs.split("$")[:3] == entry.split("$")[:3]  # user:, 7, 101
    assert check_password_entry(theirs, "s3cret") and not check_password_entry(theirs, "x")


def test_acl_blocks_are_replaced_not_duplicated() -> None:
    text = ("# global rules\ntopic read $SYS/#\n\nuser a.k1\ntopic write x\n\n"
            "user a.k2\ntopic write y\n")
    out = replace_acl_block(text, "a.k1", "user a.k1\ntopic write z\n")
    assert out == ("# global rules\ntopic read $SYS/#\n\nuser a.k2\ntopic write y\n\n"
                   "user a.k1\ntopic write z\n")
    assert replace_acl_block("", "a.k1", "user a.k1\ntopic write z\n") == \
        "user a.k1\ntopic write z\n"


def test_device_folder(tmp_path: Path) -> None:
    out, ca_dir = tmp_path / "out", tmp_path / "ca"
    p = provision_device("kiosk-001", "acme", "store-12", out, "mqtt.acme.example:8883", ca_dir,
                         data_dir="/srv/storyscan", prefix="/opt/ss", camera="csi:0")
    folder = out / "kiosk-001"
    assert p.folder == folder and p.username == "acme.kiosk-001"
    assert {f.name for f in folder.iterdir()} == {
        "device.json", "ca.crt", "client.crt", "client.key", "systemd", "jetson-setup.sh"}
    for secret in ("device.json", "client.key"):
        assert (folder / secret).stat().st_mode & 0o077 == 0, secret
    assert (ca_dir / "ca.key").stat().st_mode & 0o077 == 0
    assert not (folder / "ca.key").exists() and not (out / "broker" / "ca.key").exists()

    config = json.loads((folder / "device.json").read_text())
    assert (config["device"], config["fleet"], config["group"]) == ("kiosk-001", "acme",
                                                                    "store-12")
    broker = config["broker"]
    assert (broker["host"], broker["port"], broker["username"]) == ("mqtt.acme.example", 8883,
                                                                    "acme.kiosk-001")
    assert len(broker["password"]) >= 32
    assert broker["tls"] == {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"}
    assert config["topics"]["scans"] == "storyscan/v1/acme/kiosk-001/scans"
    assert config["topics"]["group"] == "storyscan/v1/acme/groups/store-12/#"
    assert config["paths"]["scans"] == "/srv/storyscan/scans.db"
    assert "release_key" not in json.dumps(config)  # releases are not built yet
    loaded = DeviceConfig.load(folder / "device.json")  # the agent reads it as written
    assert loaded.broker.cert == folder.resolve() / "client.crt"

    # the broker's files: the password line checks the device's password; ACL by username
    broker_dir = out / "broker"
    passwd = (broker_dir / "passwd").read_text().splitlines()
    assert passwd == [p.password_entry]
    assert check_password_entry(passwd[0], broker["password"])
    acl = (broker_dir / "acl").read_text()
    assert acl == p.acl
    assert acl.splitlines()[0] == "user acme.kiosk-001"
    assert "topic write storyscan/v1/acme/kiosk-001/scans" in acl
    assert "topic read storyscan/v1/acme/kiosk-001/cmd" in acl
    assert "topic read storyscan/v1/acme/groups/store-12/#" in acl
    assert "topic write storyscan/v1/acme/kiosk-001/#" not in acl  # not its own cmd topic
    conf = (broker_dir / "storyscan.conf").read_text()
    for line in ("listener 8883", "require_certificate true", "use_identity_as_username false",
                 "allow_anonymous false", "password_file /etc/mosquitto/storyscan/passwd",
                 "acl_file /etc/mosquitto/storyscan/acl", "per_listener_settings false"):
        assert line in conf.splitlines(), line

    # TLS: the client certificate and the broker's are signed by the fleet CA
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    client = x509.load_pem_x509_certificate((folder / "client.crt").read_bytes())
    server = x509.load_pem_x509_certificate((broker_dir / "server.crt").read_bytes())
    for cert in (client, server):
        cert.verify_directly_issued_by(ca)
    assert client.subject.rfc4514_string().startswith("CN=acme.kiosk-001")
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mqtt.acme.example" in san.get_values_for_type(x509.DNSName)

    # systemd units and the set-up script
    kiosk = (folder / "systemd" / "storyscan-kiosk.service").read_text()
    agent = (folder / "systemd" / "storyscan-agent.service").read_text()
    # the kiosk runs the agent in its process, on the model the device config names (a
    # release moves it); the agent's own unit can never run beside it
    assert ("/opt/ss/bin/storyscan kiosk --camera csi:0 --agent /etc/storyscan/device.json"
            in kiosk) and "--bundle" not in kiosk
    assert "--scans /srv/storyscan/scans.db" in kiosk
    assert "ExecStart=/opt/ss/bin/storyscan agent --config /etc/storyscan/device.json" in agent
    assert "Restart=always" in agent and "Conflicts=storyscan-kiosk.service" in agent
    script = (folder / "jetson-setup.sh").read_text()
    for step in ("nvpmodel -m", "jetson_clocks", "systemctl is-active --quiet jtop.service",
                 "systemctl enable --now storyscan-kiosk.service\n",
                 "systemctl disable storyscan-agent.service"):
        assert step in script, step
    assert (folder / "jetson-setup.sh").stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(folder / "jetson-setup.sh")]).returncode == 0


def test_one_ca_per_fleet_and_reprovisioning_replaces(tmp_path: Path) -> None:
    out, ca_dir = tmp_path / "out", tmp_path / "ca"
    first = provision_device("k1", "acme", "g1", out, "127.0.0.1:8883", ca_dir)
    ca_pem = (ca_dir / "ca.crt").read_bytes()
    provision_device("k2", "acme", "g1", out, "127.0.0.1:8883", ca_dir)
    again = provision_device("k1", "acme", "g2", out, "127.0.0.1:8883", ca_dir)
    assert (ca_dir / "ca.crt").read_bytes() == ca_pem  # the CA is kept
    passwd = (out / "broker" / "passwd").read_text().splitlines()
    assert [ln.split(":")[0] for ln in passwd] == ["acme.k2", "acme.k1"]
    assert again.password_entry in passwd and first.password_entry not in passwd
    acl = (out / "broker" / "acl").read_text()
    assert acl.count("user acme.k1") == 1 and "groups/g2/#" in acl and "groups/g1/#" in acl
    ops = provision_controller("ops", "acme", out, "127.0.0.1:8883", ca_dir)
    assert "topic write storyscan/v1/acme/+/cmd" in ops.acl
    assert "topic read storyscan/v1/acme/+/scans" in ops.acl
    with pytest.raises(ProvisionError, match="another fleet"):
        provision_device("k1", "other", "g1", tmp_path / "o2", "127.0.0.1:8883", ca_dir)
    with pytest.raises(ProvisionError, match="already a controller"):
        provision_device("ops", "acme", "g1", out, "127.0.0.1:8883", ca_dir)
    with pytest.raises(ProvisionError):
        provision_device("k/3", "acme", "g1", out, "127.0.0.1:8883", ca_dir)


def test_provision_command(tmp_path: Path) -> None:
    r = storyscan("provision", "k9", "--fleet", "acme", "--group", "g1", "--out",
                  tmp_path / "out", "--broker", "10.0.0.2:8883")
    assert r.returncode == 0, r.stderr
    assert "acme.k9:$7$101$" in r.stdout and "user acme.k9" in r.stdout
    assert "release public key" in r.stdout
    assert (tmp_path / "out" / "ca-acme" / "ca.key").is_file()
    r = storyscan("provision", "k9", "--fleet", "acme", "--out", tmp_path / "out")
    assert r.returncode == 1 and "--group" in r.stderr
    r = storyscan("provision", "groups", "--fleet", "acme", "--group", "g1", "--out",
                  tmp_path / "out")
    assert r.returncode == 1 and "reserved" in r.stderr
