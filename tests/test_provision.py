"""The fleet directory and ``edgefleet provision``: identities on disk, bundles, revocation.

Real files, real cryptography, and a real Mosquitto for the revocation reload.
"""

from __future__ import annotations

import socket
import ssl
import stat
from pathlib import Path

import pytest
import yaml
from broker import ClientTls, Mosquitto, MqttProbe, free_port
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgefleet.agent.config import load_config
from edgefleet.ops.cli import main
from edgefleet.ops.profile import OperatorProfile
from edgefleet.provisioning import (
    DEVICE_INSTALL_DIR,
    DEVICE_STATE_DIR,
    AlreadyIssued,
    FleetDir,
    FleetExists,
    NotAFleet,
    NotIssued,
    key_id,
    load_public_key,
    open_key_set,
    pki,
    read_key_set,
)
from edgefleet.provisioning.mosquitto import BrokerListener, TlsFiles

ROOT = "edgefleet/v1"
PRIVATE_KEYS = (
    "ca/ca.key",
    "operator-ca/ca.key",
    "claim-ca/ca.key",
    "claim/claim.key",
    "broker/broker.key",
    "operators/controller.key",
    "operators/enroll.key",
    "keys/root.key",
    "keys/release-1.key",
)
PUBLIC_FILES = (
    "fleet.yaml",
    "operator.yaml",
    "ca/ca.crt",
    "ca/crl.pem",
    "ca/issued.json",
    "operator-ca/ca.crt",
    "operator-ca/crl.pem",
    "claim-ca/ca.crt",
    "claim/claim.crt",
    "broker/broker.crt",
    "operators/controller.crt",
    "operators/enroll.crt",
    "keys/root.pub",
    "keys/release-1.pub",
    "keys/keyset.json",
)
REFUSED_NAMES = [
    "dev/1",
    "dev+1",
    "dev#",
    "$SYS",
    "dev\x001",
    "dev\n1",
    "x" * 65,
    "controller",
    "claim",
    "enroll",
]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> FleetDir:
    """A fleet for tests that only read it."""
    return FleetDir.init(tmp_path_factory.mktemp("made") / "fleet")


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    """A fresh fleet of this test's own."""
    return FleetDir.init(tmp_path / "fleet")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` and each file's content."""
    return {
        str(path.relative_to(directory)): path.read_bytes() if path.is_file() else None
        for path in sorted(directory.rglob("*"))
    }


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl_serials(path: Path) -> set[int]:
    return {revoked.serial_number for revoked in x509.load_pem_x509_crl(path.read_bytes())}


# -- init --------------------------------------------------------------------------------


def test_init_writes_every_key_0600_and_every_directory_0700(made: FleetDir) -> None:
    for name in PRIVATE_KEYS:
        assert _mode(made.root / name) == 0o600, name
    for name in PUBLIC_FILES:
        assert (made.root / name).is_file(), name
    directories = [made.root, *(p for p in made.root.rglob("*") if p.is_dir())]
    assert {str(d.relative_to(made.root)) for d in directories} >= {
        ".",
        "ca",
        "operator-ca",
        "claim-ca",
        "claim",
        "broker",
        "operators",
        "keys",
        "enroll",
        "devices",
    }
    for directory in directories:
        assert _mode(directory) == 0o700, directory
    keys = list(made.root.rglob("*.key"))
    assert all(_mode(p) == 0o600 for p in keys)


def test_init_leaves_no_staging_directory_beside_the_fleet(made: FleetDir) -> None:
    assert [p.name for p in made.root.parent.iterdir()] == ["fleet"]


def test_init_issues_each_identity_from_its_own_ca(made: FleetDir) -> None:
    device_ca = _certificate(made.ca_cert)
    operator_ca = _certificate(made.operator_ca_cert)
    claim_ca = _certificate(made.claim_ca_cert)
    broker = _certificate(made.broker_cert)
    controller = _certificate(made.controller_cert)
    claim = _certificate(made.claim_cert)

    assert pki.is_issued_by(broker, device_ca)
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert pki.common_name(controller) == "controller"
    assert pki.is_issued_by(controller, operator_ca)
    assert not pki.is_issued_by(controller, device_ca)
    assert pki.common_name(claim) == "claim"
    assert pki.is_issued_by(claim, claim_ca)
    assert not pki.is_issued_by(claim, device_ca)


def test_init_signs_the_release_key_set_with_the_root_key(made: FleetDir) -> None:
    key_set = open_key_set(read_key_set(made.keyset_path), load_public_key(made.root_pub))

    assert key_set.version == 1
    assert key_set.trusted_keys().key_ids == {key_id(load_public_key(made.release_pub))}


def test_init_writes_an_operator_profile_with_absolute_paths(made: FleetDir) -> None:
    profile = OperatorProfile.model_validate(yaml.safe_load(made.operator_profile.read_text()))

    assert (profile.host, profile.port, profile.topic_root) == ("localhost", 8885, ROOT)
    for path in (profile.cafile, profile.certfile, profile.keyfile):
        assert path is not None
        assert path.is_absolute()
        assert path.is_file()
    assert profile.certfile == made.controller_cert


def test_init_records_every_certificate_in_the_ledger(made: FleetDir) -> None:
    entries = {(e.name, e.kind) for e in made.ledger().certificates}

    assert entries == {
        ("edgefleet devices", "ca"),
        ("edgefleet operators", "ca"),
        ("edgefleet claim", "ca"),
        ("localhost", "broker"),
        ("controller", "operator"),
        ("enroll", "operator"),
        ("claim", "claim"),
    }
    assert _crl_serials(made.crl_path) == set()
    assert made.operator_identities() == ["controller", "enroll"]


def test_init_refuses_an_existing_fleet_and_changes_nothing(
    fleet: FleetDir, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(fleet.root)

    with pytest.raises(FleetExists, match="already holds a fleet"):
        FleetDir.init(fleet.root)
    assert main(["provision", "init", str(fleet.root)]) == 2

    assert _snapshot(fleet.root) == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_init_refuses_a_directory_that_holds_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    with pytest.raises(FleetExists, match="not empty"):
        FleetDir.init(tmp_path)

    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_init_takes_broker_names_and_topic_root_from_the_command_line(tmp_path: Path) -> None:
    code = main(
        [
            "provision",
            "init",
            str(tmp_path / "f"),
            "--broker-name",
            "mqtt.example.internal",
            "--broker-name",
            "10.0.0.5",
            "--topic-root",
            "acme/v1",
        ]
    )

    fleet = FleetDir.load(tmp_path / "f")
    names = _certificate(fleet.broker_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert code == 0
    assert names.value.get_values_for_type(x509.DNSName) == ["mqtt.example.internal"]
    assert fleet.settings().topic_root == "acme/v1"
    assert fleet.settings().broker_host == "mqtt.example.internal"


def test_load_names_what_is_missing(tmp_path: Path, fleet: FleetDir) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAFleet, match=r"no fleet\.yaml"):
        FleetDir.load(tmp_path / "empty")
    fleet.ca_key.unlink()
    with pytest.raises(NotAFleet, match=r"ca\.key is missing"):
        FleetDir.load(fleet.root)


# -- device bundles ----------------------------------------------------------------------


def test_device_bundle_holds_a_certificate_for_the_name_from_the_fleet_ca(
    fleet: FleetDir,
) -> None:
    bundle = fleet.issue_device("shop-0042")

    certificate = _certificate(bundle / "device.crt")
    key = pki.load_certificate_key(bundle / "device.key")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "agent.yaml",
        "ca.crt",
        "device.crt",
        "device.key",
        "keyset.json",
        "root.pub",
    ]
    assert pki.common_name(certificate) == "shop-0042"
    assert pki.is_issued_by(certificate, _certificate(bundle / "ca.crt"))
    assert key.public_key() == certificate.public_key()
    assert _mode(bundle / "device.key") == 0o600
    assert _mode(bundle) == 0o700
    key_set = open_key_set(
        read_key_set(bundle / "keyset.json"), load_public_key(bundle / "root.pub")
    )
    assert key_set.version == 1
    assert [e.serial for e in fleet.live_certificates("shop-0042")] == [
        format(certificate.serial_number, "x")
    ]


def test_starter_agent_yaml_loads_with_the_agent_config_loader(fleet: FleetDir) -> None:
    bundle = fleet.issue_device("shop-0042")
    text = (bundle / "agent.yaml").read_text()
    assert f"{DEVICE_STATE_DIR}/device.key" in text
    assert f"{DEVICE_INSTALL_DIR}/root.pub" in text
    for installed in (DEVICE_INSTALL_DIR, DEVICE_STATE_DIR):
        text = text.replace(str(installed), str(bundle))
    (bundle / "here.yaml").write_text(text)

    config = load_config(bundle / "here.yaml", environ={})

    assert config.device_id == "shop-0042"
    assert (config.broker.host, config.broker.port) == ("localhost", 8883)
    tls = config.broker.tls
    assert tls is not None
    assert tls.certfile is not None
    assert tls.keyfile is not None
    for path in (tls.cafile, tls.certfile, tls.keyfile):
        assert path.is_file()
    assert config.updates.trusted_keys == []
    assert config.updates.root_key == bundle / "root.pub"
    assert config.updates.key_set == bundle / "keyset.json"


@pytest.mark.parametrize("name", REFUSED_NAMES, ids=ascii)
def test_names_that_could_escape_the_acl_are_never_signed(fleet: FleetDir, name: str) -> None:
    before = _snapshot(fleet.root)

    with pytest.raises(pki.InvalidIdentity):
        fleet.issue_device(name)
    with pytest.raises(pki.InvalidIdentity):
        fleet.sign_device_csr(pki.make_csr(pki.generate_key(), "x"), name)
    code = main(["provision", "device", name, "--fleet", str(fleet.root)])

    assert code == 2
    assert _snapshot(fleet.root) == before


def test_device_refuses_a_name_that_holds_a_live_certificate(
    fleet: FleetDir, tmp_path: Path
) -> None:
    fleet.issue_device("dev1")
    ledger = fleet.ledger_path.read_bytes()

    with pytest.raises(AlreadyIssued, match="live certificate"):
        fleet.issue_device("dev1", out=tmp_path / "elsewhere")
    code = main(["provision", "device", "dev1", "--fleet", str(fleet.root)])

    assert code == 2
    assert fleet.ledger_path.read_bytes() == ledger
    assert not (tmp_path / "elsewhere").exists()


def test_device_refuses_to_overwrite_a_bundle_of_a_revoked_name(fleet: FleetDir) -> None:
    bundle = fleet.issue_device("dev1")
    fleet.revoke("dev1")
    key = (bundle / "device.key").read_bytes()

    with pytest.raises(AlreadyIssued, match="refusing to overwrite a bundle"):
        fleet.issue_device("dev1")

    assert (bundle / "device.key").read_bytes() == key


def test_device_replace_revokes_the_old_certificate_and_writes_a_new_bundle(
    fleet: FleetDir,
) -> None:
    old = _certificate(fleet.issue_device("dev1") / "device.crt")

    code = main(["provision", "device", "dev1", "--fleet", str(fleet.root), "--replace"])

    new = _certificate(fleet.device_dir("dev1") / "device.crt")
    assert code == 0
    assert new.serial_number != old.serial_number
    assert _crl_serials(fleet.crl_path) == {old.serial_number}
    assert [e.serial for e in fleet.live_certificates("dev1")] == [format(new.serial_number, "x")]
    assert [p.name for p in fleet.devices_dir.iterdir()] == ["dev1"]


def test_device_writes_the_bundle_where_out_says(fleet: FleetDir, tmp_path: Path) -> None:
    out = tmp_path / "usb" / "cam-7"
    out.parent.mkdir()

    code = main(["provision", "device", "cam-7", "--fleet", str(fleet.root), "--out", str(out)])

    assert code == 0
    assert pki.common_name(_certificate(out / "device.crt")) == "cam-7"
    assert _mode(out / "device.key") == 0o600
    assert not fleet.device_dir("cam-7").exists()


def test_the_fleet_defaults_from_the_environment(
    fleet: FleetDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFLEET_FLEET", str(fleet.root))

    assert main(["provision", "device", "dev9", "--days", "30"]) == 0

    entry = fleet.live_certificates("dev9")[0]
    assert 29 < pki.days_to_expiry(_certificate(fleet.device_dir("dev9") / "device.crt")) < 31
    assert entry.serial in capsys.readouterr().out


def test_a_command_without_a_fleet_says_how_to_name_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EDGEFLEET_FLEET", raising=False)

    assert main(["provision", "list"]) == 2
    assert "EDGEFLEET_FLEET" in capsys.readouterr().err


# -- signing requests ----------------------------------------------------------------------


def test_sign_device_csr_certifies_the_requests_key_under_the_given_name(
    fleet: FleetDir,
) -> None:
    key = pki.generate_key()

    certificate = fleet.sign_device_csr(pki.make_csr(key, "whatever"), "dev5", days=10)

    assert pki.common_name(certificate) == "dev5"
    assert certificate.public_key() == key.public_key()
    assert pki.is_issued_by(certificate, _certificate(fleet.ca_cert))
    assert [e.serial for e in fleet.live_certificates("dev5")] == [
        format(certificate.serial_number, "x")
    ]


# -- revocation --------------------------------------------------------------------------


def test_revoke_puts_every_certificate_of_the_name_in_the_crl(
    fleet: FleetDir, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _certificate(fleet.issue_device("dev1") / "device.crt")
    renewed = fleet.sign_device_csr(pki.make_csr(pki.generate_key(), "dev1"), "dev1")
    other = _certificate(fleet.issue_device("dev2") / "device.crt")

    code = main(["provision", "revoke", "dev1", "--fleet", str(fleet.root)])

    crl = x509.load_pem_x509_crl(fleet.crl_path.read_bytes())
    assert code == 0
    assert _crl_serials(fleet.crl_path) == {first.serial_number, renewed.serial_number}
    assert other.serial_number not in _crl_serials(fleet.crl_path)
    assert crl.is_signature_valid(_certificate(fleet.ca_cert).public_key())  # type: ignore[arg-type]
    assert fleet.live_certificates("dev1") == []
    assert "systemctl reload mosquitto" in capsys.readouterr().out


def test_revoke_of_an_operator_writes_the_operator_crl(fleet: FleetDir) -> None:
    controller = _certificate(fleet.controller_cert)

    fleet.revoke("controller")

    assert _crl_serials(fleet.operator_crl_path) == {controller.serial_number}
    assert _crl_serials(fleet.crl_path) == set()
    assert fleet.operator_identities() == ["enroll"]


def test_revoke_refuses_a_name_never_issued_or_already_revoked(fleet: FleetDir) -> None:
    fleet.issue_device("dev1")
    fleet.revoke("dev1")
    crl = fleet.crl_path.read_bytes()

    with pytest.raises(NotIssued, match="never issued"):
        fleet.revoke("nobody")
    with pytest.raises(NotIssued, match="revoked already"):
        fleet.revoke("dev1")
    assert main(["provision", "revoke", "nobody", "--fleet", str(fleet.root)]) == 2
    assert main(["provision", "revoke", "claim", "--fleet", str(fleet.root)]) == 2

    assert fleet.crl_path.read_bytes() == crl


def test_crl_command_writes_the_crls_again_from_the_ledger(fleet: FleetDir) -> None:
    revoked = _certificate(fleet.issue_device("dev1") / "device.crt")
    fleet.revoke("dev1")
    fleet.crl_path.unlink()

    assert main(["provision", "crl", "--fleet", str(fleet.root)]) == 0

    assert _crl_serials(fleet.crl_path) == {revoked.serial_number}
    assert _crl_serials(fleet.operator_crl_path) == set()


def test_list_shows_every_certificate_and_its_revocation(
    fleet: FleetDir, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.issue_device("dev1")
    fleet.issue_device("dev2")
    fleet.revoke("dev1")
    capsys.readouterr()

    assert main(["provision", "list", "--fleet", str(fleet.root)]) == 0

    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["dev1"].split()[-1] != "-"
    assert lines["dev2"].split()[-1] == "-"
    assert "controller" in lines
    assert "claim" in lines


# -- the broker's reload -----------------------------------------------------------------


def _tls_refusal(broker: Mosquitto, client: ClientTls) -> str:
    """The TLS alert the broker answers ``client`` with; fails the test if it accepts it.

    With TLS 1.3 the client's handshake completes before the broker checked the client
    certificate, so the refusal arrives as an alert on the first read.
    """
    context = ssl.create_default_context(cafile=str(client.cafile))
    context.load_cert_chain(client.certfile, client.keyfile)  # type: ignore[arg-type]
    with (
        socket.create_connection((broker.host, broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError) as refusal,
        context.wrap_socket(raw, server_hostname=broker.host) as tls,
    ):
        tls.recv(1)
    return str(refusal.value)


def _device_tls(fleet: FleetDir, name: str) -> ClientTls:
    bundle = fleet.device_dir(name)
    return ClientTls(bundle / "ca.crt", bundle / "device.crt", bundle / "device.key")


def test_a_revoked_device_is_refused_once_the_broker_reloads_on_sighup(
    fleet: FleetDir, tmp_path: Path, mosquitto_binary: Path
) -> None:
    fleet.issue_device("dev1")
    fleet.issue_device("dev2")
    tls = TlsFiles(
        cafile=fleet.ca_cert,
        certfile=fleet.broker_cert,
        keyfile=fleet.broker_key,
        crlfile=fleet.crl_path,
    )
    # Client ids of their own: one identity holds two connections here.
    listener = BrokerListener(port=free_port(), tls=tls)
    overrides = {"listeners": [listener], "allow_anonymous": False}

    with (
        Mosquitto(tmp_path / "broker", settings_overrides=overrides) as broker,
        MqttProbe(broker, "dev1-a", tls=_device_tls(fleet, "dev1")) as before,
    ):
        assert not before.publish(f"{ROOT}/dev1/health", b"{}").is_failure
        assert main(["provision", "revoke", "dev1", "--fleet", str(fleet.root)]) == 0
        # Until the reload the broker holds the CRL it read at start.
        with MqttProbe(broker, "dev1-b", tls=_device_tls(fleet, "dev1")) as not_yet:
            assert not not_yet.publish(f"{ROOT}/dev1/health", b"{}").is_failure

        broker.reload()

        refused = _tls_refusal(broker, _device_tls(fleet, "dev1"))
        with MqttProbe(broker, "dev2", tls=_device_tls(fleet, "dev2")) as dev2:
            assert not dev2.publish(f"{ROOT}/dev2/health", b"{}").is_failure
        # A connection made before the reload is not checked again.
        assert not before.publish(f"{ROOT}/dev1/health", b"{}").is_failure

    assert "certificate revoked" in refused, refused


def test_each_revocation_takes_effect_at_its_own_reload(
    fleet: FleetDir, tmp_path: Path, mosquitto_binary: Path
) -> None:
    for name in ("dev1", "dev2", "dev3"):
        fleet.issue_device(name)
    tls = TlsFiles(
        cafile=fleet.ca_cert,
        certfile=fleet.broker_cert,
        keyfile=fleet.broker_key,
        crlfile=fleet.crl_path,
    )
    listener = BrokerListener(port=free_port(), tls=tls, use_username_as_clientid=True)
    overrides = {"listeners": [listener], "allow_anonymous": False}

    with Mosquitto(tmp_path / "broker", settings_overrides=overrides) as broker:
        fleet.revoke("dev1")
        broker.reload()
        fleet.revoke("dev2")
        broker.reload()

        refused = [_tls_refusal(broker, _device_tls(fleet, name)) for name in ("dev1", "dev2")]
        with MqttProbe(broker, "dev3", tls=_device_tls(fleet, "dev3")) as dev3:
            assert not dev3.publish(f"{ROOT}/dev3/health", b"{}").is_failure

    assert all("certificate revoked" in how for how in refused), refused


def test_the_crl_written_in_the_same_second_as_the_last_still_replaces_it(
    fleet: FleetDir,
) -> None:
    fleet.issue_device("dev1")
    first = x509.load_pem_x509_crl(fleet.crl_path.read_bytes()).last_update_utc

    fleet.revoke("dev1")

    assert x509.load_pem_x509_crl(fleet.crl_path.read_bytes()).last_update_utc > first


def test_no_file_the_fleet_writes_is_readable_by_others(fleet: FleetDir) -> None:
    fleet.issue_device("dev1")
    fleet.revoke("dev1")

    for path in fleet.root.rglob("*"):
        if path.suffix == ".key" or path.is_dir():
            assert _mode(path) & (stat.S_IRWXG | stat.S_IRWXO) == 0, path
