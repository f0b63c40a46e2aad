"""The device's identity: the refusal of a private key others may read, a renewal cut by a
crash, and, with a real agent, Mosquitto and enrollment service, first-boot enrollment from
a claim token and a renewal that switches certificates without losing an event."""

from __future__ import annotations

import datetime
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agentproc import AGENT, AgentProcess
from broker import MqttProbe
from conftest import Assets
from test_agent import agent_config
from test_enrollment import Fleet, Running, fleet, idle_service, service  # noqa: F401 (fixtures)

from edgefleet.agent.config import ConfigError, check_files, key_file_problems, load_config
from edgefleet.agent.identity import (
    finish_pending_switch,
    needs_enrollment,
    next_path,
    prepare_identity,
)
from edgefleet.agent.protocol import EventMessage, HealthMessage, Topics
from edgefleet.agent.systemd import Notifier
from edgefleet.provisioning import pki

ROOT = "edgefleet/v1"


def _pair(
    directory: Path, ca: pki.Issued, name: str, *, days: int = 2, age_days: int = 0
) -> tuple[Path, Path]:
    """A key (0600) and a certificate for ``name`` from ``ca``, issued ``age_days`` ago."""
    directory.mkdir(parents=True, exist_ok=True)
    key = pki.generate_key()
    issued = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=age_days)
    cert = pki.issue_certificate(ca, key.public_key(), name, days=days, now=issued)
    pki.write_private_key(directory / f"{name}.key", key, replace=True)
    pki.write_certificate(directory / f"{name}.crt", cert, replace=True)
    return directory / f"{name}.crt", directory / f"{name}.key"


def _tls_config(tmp_path: Path, keyfile: Path, certfile: Path, cafile: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"""device_id: dev1
broker: {{host: 127.0.0.1, port: 1, tls: {{cafile: {cafile}, certfile: {certfile},
  keyfile: {keyfile}}}}}
streams:
  - name: cam
    source: {{type: file, path: {tmp_path / "missing.mp4"}}}
    model: {{path: {tmp_path / "missing.tflite"}}}
outbox: {{path: {tmp_path / "outbox.sqlite3"}}}
updates: {{store_dir: {tmp_path / "store"}, trusted_keys: []}}
"""
    )
    return path


@pytest.fixture
def exposed_key(tmp_path: Path) -> tuple[Path, Path]:
    """A config whose device key is a real file of mode 0644, and that key."""
    ca = pki.create_ca("ca", days=2)
    certfile, keyfile = _pair(tmp_path / "id", ca, "dev1")
    pki.write_certificate(tmp_path / "id" / "ca.crt", ca.certificate)
    keyfile.chmod(0o644)
    return _tls_config(tmp_path, keyfile, certfile, tmp_path / "id" / "ca.crt"), keyfile


def test_the_agent_refuses_to_start_with_a_private_key_others_can_read(
    exposed_key: tuple[Path, Path], tmp_path: Path
) -> None:
    config, keyfile = exposed_key

    command = [str(AGENT), "run", "--config", str(config)]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)

    assert run.returncode == 2, run.stderr
    line = next(x for x in run.stderr.splitlines() if "broker.tls.keyfile" in x)
    assert str(keyfile) in line
    assert f"chmod 600 {keyfile}" in line
    assert "0644" in line
    assert not (tmp_path / "outbox.sqlite3").exists(), "nothing started"


def test_check_config_reports_a_private_key_others_can_read(
    exposed_key: tuple[Path, Path],
) -> None:
    config, keyfile = exposed_key

    command = [str(AGENT), "check-config", str(config)]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)

    assert run.returncode == 2
    assert f"broker.tls.keyfile: the private key {keyfile}" in run.stderr
    assert f"chmod 600 {keyfile}" in run.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602])
def test_a_key_readable_or_writable_by_group_or_others_is_refused(
    exposed_key: tuple[Path, Path], mode: int
) -> None:
    config, keyfile = exposed_key
    keyfile.chmod(mode)

    problems = key_file_problems(load_config(config))

    assert len(problems) == 1
    assert f"chmod 600 {keyfile}" in problems[0]


def test_a_key_only_its_owner_reads_passes(exposed_key: tuple[Path, Path]) -> None:
    config, keyfile = exposed_key
    keyfile.chmod(0o600)

    assert key_file_problems(load_config(config)) == []


def test_check_config_of_a_device_to_enroll_wants_the_claim_files_not_a_certificate(
    tmp_path: Path,
) -> None:
    ca = pki.create_ca("ca", days=2)
    pki.write_certificate(tmp_path / "ca.crt", ca.certificate)
    config = _tls_config(
        tmp_path, tmp_path / "device.key", tmp_path / "device.crt", tmp_path / "ca.crt"
    )
    claim = tmp_path / "claim"
    config.write_text(
        config.read_text()
        + f"enrollment: {{claim_certfile: {claim}.crt, claim_keyfile: {claim}.key, "
        f"token_file: {tmp_path / 'token'}}}\n"
    )

    problems = check_files(load_config(config))

    assert not [p for p in problems if p.startswith("broker.tls")]
    assert f"enrollment.token_file: no such file {tmp_path / 'token'}" in problems
    assert f"enrollment.claim_certfile: no such file {claim}.crt" in problems


def test_a_renewal_cut_between_its_two_renames_is_finished_at_start(tmp_path: Path) -> None:
    ca = pki.create_ca("ca", days=2)
    certfile, keyfile = _pair(tmp_path, ca, "dev1")
    new_cert, new_key = _pair(tmp_path / "new", ca, "dev1", days=1)
    new_key.replace(keyfile)  # the key was renamed, then the power went
    new_cert.replace(next_path(certfile))

    finish_pending_switch(certfile, keyfile)

    cert = pki.load_certificate(certfile)
    assert cert.public_key() == pki.load_certificate_key(keyfile).public_key()
    assert not next_path(certfile).exists()


def test_a_renewal_that_got_no_answer_leaves_the_old_pair(tmp_path: Path) -> None:
    ca = pki.create_ca("ca", days=2)
    certfile, keyfile = _pair(tmp_path, ca, "dev1")
    before = (certfile.read_bytes(), keyfile.read_bytes())
    pki.write_private_key(next_path(keyfile), pki.generate_key())

    finish_pending_switch(certfile, keyfile)

    assert (certfile.read_bytes(), keyfile.read_bytes()) == before
    assert not next_path(keyfile).exists()


def test_a_certificate_issued_to_another_name_than_device_id_is_refused(tmp_path: Path) -> None:
    ca = pki.create_ca("ca", days=2)
    certfile, keyfile = _pair(tmp_path / "id", ca, "dev2")
    pki.write_certificate(tmp_path / "ca.crt", ca.certificate)
    config = load_config(_tls_config(tmp_path, keyfile, certfile, tmp_path / "ca.crt"))

    with pytest.raises(ConfigError, match="set device_id: dev2"):
        prepare_identity(config, source="agent.yaml", stop=threading.Event(), notifier=Notifier())


def test_an_expired_certificate_is_enrolled_again_only_with_a_new_token(tmp_path: Path) -> None:
    ca = pki.create_ca("ca", days=30)
    certfile, _ = _pair(tmp_path, ca, "dev1", days=2, age_days=3)  # expired a day ago
    token_file = tmp_path / "token"

    without_token = needs_enrollment(certfile, token_file)
    token_file.write_text("ef1.x.y")
    with_token = needs_enrollment(certfile, token_file)
    fresh, _ = _pair(tmp_path / "fresh", ca, "dev1", days=2)

    assert (without_token, with_token) == (False, True)
    assert needs_enrollment(fresh, token_file) is False
    assert needs_enrollment(tmp_path / "none.crt", token_file) is True


# -- a real agent -----------------------------------------------------------------------


def _device_config(
    assets: Assets, net: Fleet, workdir: Path, device: str, **enrollment: Any
) -> dict[str, Any]:
    config = agent_config(assets, net.device_port, workdir)
    config["device_id"] = device
    config["streams"][0]["events"]["tracking"] = {"enabled": False}  # many events
    config["broker"].update(
        host="127.0.0.1",
        tls={
            "cafile": str(net.directory / "device-ca.crt"),
            "certfile": str(workdir / "id" / "device.crt"),
            "keyfile": str(workdir / "id" / "device.key"),
        },
    )
    config["enrollment"] = {"retry_min_s": 0.5, "retry_max_s": 2, "timeout_s": 10, **enrollment}
    return config


def _controller(net: Fleet, device: str) -> MqttProbe:
    probe = MqttProbe(net.broker, port=net.operator_port, tls=net.tls("controller"), timeout_s=30)
    probe.connect()
    probe.subscribe(f"{ROOT}/{device}/#")
    return probe


def _events(probe: MqttProbe, device: str) -> list[EventMessage]:
    prefix = f"{ROOT}/{device}/events/"
    return [
        EventMessage.model_validate_json(m.payload)
        for m in probe.messages()
        if m.topic.startswith(prefix)
    ]


def _healths(probe: MqttProbe, device: str) -> list[HealthMessage]:
    return [
        HealthMessage.model_validate_json(m.payload)
        for m in probe.messages(Topics(device, ROOT).health)
    ]


def test_a_device_holding_only_a_claim_token_enrolls_and_publishes_as_itself(
    assets: Assets,
    fleet: Fleet,  # noqa: F811 (the fixture)
    service: Running,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "agent"
    (workdir / "id").mkdir(parents=True)
    token = service.store.add("shop-9", lifetime_s=600, now=time.time())
    token_file = workdir / "id" / "token"
    token_file.write_text(token.token + "\n")
    config = _device_config(
        assets,
        fleet,
        workdir,
        "shop-9",
        claim_certfile=str(fleet.directory / "claim.crt"),
        claim_keyfile=str(fleet.directory / "claim.key"),
        token_file=str(token_file),
        claim_host="127.0.0.1",
        claim_port=fleet.claim_port,
    )
    controller = _controller(fleet, "shop-9")

    with AgentProcess(workdir, config) as agent:
        controller.wait_until(lambda: _events(controller, "shop-9"), "events of shop-9", 60)
        controller.wait_until(lambda: _healths(controller, "shop-9"), "health of shop-9", 30)
        assert agent.terminate() == 0

    key, cert = workdir / "id" / "device.key", workdir / "id" / "device.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certificate = pki.load_certificate(cert)
    assert pki.common_name(certificate) == "shop-9"
    assert pki.is_issued_by(certificate, fleet.device_ca.certificate)
    assert not token_file.exists()
    assert "enrolled as shop-9" in agent.log()
    assert (_healths(controller, "shop-9")[-1].certificate_days_left or 0) > 29
    controller.disconnect()


def test_a_refused_token_is_logged_with_its_code_and_tried_again(
    assets: Assets,
    fleet: Fleet,  # noqa: F811 (the fixture)
    service: Running,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "agent"
    (workdir / "id").mkdir(parents=True)
    token_file = workdir / "id" / "token"
    token_file.write_text("ef1.AAAAAAAAAAAA." + "B" * 43)
    config = _device_config(
        assets,
        fleet,
        workdir,
        "shop-8",
        claim_certfile=str(fleet.directory / "claim.crt"),
        claim_keyfile=str(fleet.directory / "claim.key"),
        token_file=str(token_file),
        claim_host="127.0.0.1",
        claim_port=fleet.claim_port,
    )

    with AgentProcess(workdir, config) as agent:
        agent.wait_for_log("enrollment refused (token_unknown)", 60)
        key_before = (workdir / "id" / "device.key").read_bytes()
        good = service.store.add("shop-8", lifetime_s=600, now=time.time())
        token_file.write_text(good.token)  # the operator fixes the token
        agent.wait_for_log("enrolled as shop-8", 60)
        assert agent.process is not None
        assert agent.process.poll() is None, "still the same process: no crash loop"
        assert agent.terminate() == 0

    assert (workdir / "id" / "device.key").read_bytes() == key_before, "the key was kept"


def test_renewal_switches_to_the_new_certificate_without_losing_an_event(
    assets: Assets,
    fleet: Fleet,  # noqa: F811 (the fixture)
    idle_service: Running,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "agent"
    # Issued 5 days ago for 6: one day left, under renew_before_days and half its lifetime.
    old_cert, old_key = _pair(workdir / "id", fleet.device_ca, "shop-10", days=6, age_days=5)
    old_cert.rename(workdir / "id" / "device.crt")
    old_key.rename(workdir / "id" / "device.key")
    before = pki.load_certificate(workdir / "id" / "device.crt")
    config = _device_config(
        assets, fleet, workdir, "shop-10", renew_before_days=2, renew_check_s=1, timeout_s=2
    )
    controller = _controller(fleet, "shop-10")

    with AgentProcess(workdir, config) as agent:
        # No service yet: the renewal goes unanswered and is retried while events flow.
        controller.wait_until(lambda: len(_events(controller, "shop-10")) >= 20, "events", 60)
        agent.wait_for_log("certificate renewal failed: no renewal answer", 30)
        idle_service.start()
        agent.wait_for_log("certificate renewed", 60)
        renewed_at = len(_events(controller, "shop-10"))
        controller.wait_until(
            lambda: len(_events(controller, "shop-10")) >= renewed_at + 50,
            "events after the switch",
            60,
        )
        controller.wait_until(
            lambda: any(
                (h.certificate_days_left or 0) > 29 for h in _healths(controller, "shop-10")
            ),
            "health with the new certificate's lifetime",
            30,
        )
        assert agent.terminate() == 0

    after = pki.load_certificate(workdir / "id" / "device.crt")
    assert after.serial_number != before.serial_number
    assert pki.common_name(after) == "shop-10"
    assert (
        after.public_key() == pki.load_certificate_key(workdir / "id" / "device.key").public_key()
    )
    assert stat.S_IMODE((workdir / "id" / "device.key").stat().st_mode) == 0o600
    assert idle_service.signed == ["shop-10"]
    seen: dict[str, EventMessage] = {}
    for event in _events(controller, "shop-10"):
        seen.setdefault(event.id, event)  # QoS 1 may deliver twice; the id tells
    seqs = [e.seq for e in seen.values()]
    assert seqs == list(range(1, len(seqs) + 1)), "no event lost across the switch"
    controller.disconnect()
