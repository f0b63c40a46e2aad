"""From empty directories to an enrolled device publishing over mutual TLS, as an operator does it.

Every step is the command a person types: ``provision init``, ``broker config --fleet``,
Mosquitto started on that config, ``enroll token``, ``enroll serve``, an agent holding only
the claim certificate and a token, and ``edgefleet watch`` with the fleet's operator profile;
then ``provision revoke``, ``broker config`` again and the broker's reload shut the device out.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

from agentproc import AgentProcess
from broker import ClientTls, Mosquitto, MqttProbe, free_port
from conftest import Assets

from edgefleet.provisioning import pki

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
DEVICE = "shop-7"


def _edgefleet(*args: str | Path) -> str:
    done = subprocess.run(
        [str(EDGEFLEET), *map(str, args)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"edgefleet {' '.join(map(str, args))}:\n{done.stderr}"
    return done.stdout


def _agent_config(assets: Assets, fleet: Path, device: Path, ports: list[int]) -> dict[str, object]:
    """What a factory image holds: the fleet CA, the claim certificate, one token, the key set."""
    return {
        "device_id": DEVICE,
        "broker": {
            "host": "127.0.0.1",
            "port": ports[0],
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
            "tls": {
                "cafile": str(fleet / "ca" / "ca.crt"),
                "certfile": str(device / "identity" / "device.crt"),
                "keyfile": str(device / "identity" / "device.key"),
            },
        },
        "enrollment": {
            "claim_certfile": str(fleet / "claim" / "claim.crt"),
            "claim_keyfile": str(fleet / "claim" / "claim.key"),
            "token_file": str(device / "token"),
            "claim_port": ports[1],
            "retry_min_s": 0.5,
        },
        "streams": [
            {
                "name": "door",
                "source": {
                    "type": "file",
                    "path": str(assets.image("kite_pan_640x480_30fps.mp4")),
                    "loop": True,
                    "realtime": True,
                },
                "model": {"path": str(assets.ssd), "labels": str(assets.coco_labels)},
                "events": {"labels": ["person", "kite"]},
            }
        ],
        "outbox": {"path": str(device / "outbox.sqlite3")},
        "updates": {
            "store_dir": str(device / "store"),
            "trusted_keys": [],
            "root_key": str(fleet / "keys" / "root.pub"),
            "key_set": str(fleet / "keys" / "keyset.json"),
        },
        "health": {"interval_s": 1},
    }


def test_an_empty_directory_to_an_enrolled_device_seen_by_watch_then_revoked(
    tmp_path: Path, mosquitto_binary: Path, assets: Assets
) -> None:
    fleet, out, device = tmp_path / "fleet", tmp_path / "broker", tmp_path / "device"
    ports = [free_port() for _ in range(3)]
    _edgefleet(
        "provision", "init", fleet, "--broker-name", "127.0.0.1",
        "--device-port", ports[0], "--claim-port", ports[1], "--operator-port", ports[2],
    )  # fmt: skip
    user = pwd.getpwuid(os.geteuid()).pw_name
    broker_config = (
        "broker", "config", "--fleet", fleet, "--out", out, "--bind", "127.0.0.1",
        "--persistence-dir", out, "--user", user,
    )  # fmt: skip
    _edgefleet(*broker_config)
    device.mkdir()
    _edgefleet("enroll", "token", DEVICE, "--fleet", fleet, "--out", device / "token")
    conf = (out / "mosquitto.conf").read_text()

    with (
        Mosquitto.from_conf(tmp_path / "run", conf, ports[0]) as broker,
        (tmp_path / "enroll.log").open("wb") as service_log,
        subprocess.Popen(
            [str(EDGEFLEET), "enroll", "serve", "--fleet", str(fleet)], stderr=service_log
        ) as service,
        AgentProcess(device / "agent", _agent_config(assets, fleet, device, ports)) as agent,
    ):
        try:
            agent.wait_for_log(f"enrolled as {DEVICE}", 60)
            watched = subprocess.run(
                [str(EDGEFLEET), "watch", "--profile", str(fleet / "operator.yaml"),
                 "--count", "1", "--seconds", "60"],
                check=False, capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            # Revoked as docs/security.md says: revoke, refresh the broker's files, reload.
            _edgefleet("provision", "revoke", DEVICE, "--fleet", fleet)
            _edgefleet(*broker_config)
            broker.reload()
            identity = ClientTls(
                fleet / "ca" / "ca.crt", device / "identity" / "device.crt",
                device / "identity" / "device.key",
            )  # fmt: skip
            revoked = MqttProbe(broker, port=ports[0], tls=identity).connect_refused()
        finally:
            service.terminate()

    assert watched.returncode == 0, f"{watched.stderr}\nagent:\n{agent.log()}"
    assert any(line.split()[1].startswith(f"{DEVICE}/door") for line in watched.stdout.splitlines())
    certificate = pki.load_certificate(device / "identity" / "device.crt")
    assert pki.common_name(certificate) == DEVICE
    assert pki.is_issued_by(certificate, pki.load_certificate(fleet / "ca" / "ca.crt"))
    assert stat.S_IMODE((device / "identity" / "device.key").stat().st_mode) == 0o600
    assert not (device / "token").exists()  # single use: the agent drops it once enrolled
    assert revoked
