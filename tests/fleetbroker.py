"""A fleet broker for tests: the three CAs, certificates by name, and Mosquitto running the
fleet's generated listeners (provisioning.mosquitto.fleet_listeners) on free loopback ports.

Certificates come from provisioning.pki; ``broker`` holds a server certificate for
127.0.0.1, device names are issued by the device CA, ``controller`` by the operator CA and
``claim`` by the claim CA; ``stranger/dev1`` is a dev1 from a CA the broker does not know.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from broker import ClientTls, Mosquitto, free_port
from cryptography import x509

from edgefleet.provisioning import pki
from edgefleet.provisioning.mosquitto import (
    FleetBrokerFiles,
    fleet_listeners,
    render_claim_acl,
    render_device_acl,
    render_operator_acl,
)

ROOT = "edgefleet/v1"


@dataclass(frozen=True)
class FleetPki:
    """The fleet's CAs and certificates in ``directory``, and the files the broker reads."""

    directory: Path
    device_ca: pki.Issued
    files: FleetBrokerFiles

    @property
    def cafile(self) -> Path:
        """The device CA's certificate, which also signed the broker's."""
        return self.directory / "device-ca.crt"

    def client(self, name: str) -> ClientTls:
        """A client presenting the certificate issued to ``name``."""
        return ClientTls(
            self.cafile, self.directory / f"{name}.crt", self.directory / f"{name}.key"
        )

    def write_crl(self, revoked: Iterable[x509.Certificate]) -> None:
        """Replace the device CA's CRL with one revoking ``revoked``."""
        crl = pki.make_crl(
            self.device_ca,
            [(cert.serial_number, cert.not_valid_before_utc) for cert in revoked],
            next_update_days=7,
        )
        pki.write_file(self.files.crlfile, crl, mode=0o644, replace=True)


def _issue(directory: Path, ca: pki.Issued, name: str, **kwargs: object) -> x509.Certificate:
    key = pki.generate_key()
    certificate = pki.issue_certificate(ca, key.public_key(), name, days=2, **kwargs)  # type: ignore[arg-type]
    pki.write_private_key(directory / f"{name}.key", key)
    pki.write_certificate(directory / f"{name}.crt", certificate)
    return certificate


def make_fleet_pki(directory: Path, devices: Iterable[str] = ("dev1", "dev2", "dev3")) -> FleetPki:
    """Write the CAs, the broker's, the devices', the controller's and the claim certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    device_ca = pki.create_ca("edgefleet devices", days=60)
    operator_ca = pki.create_ca("edgefleet operators", days=3)
    claim_ca = pki.create_ca("edgefleet claim", days=3)
    stranger_ca = pki.create_ca("somebody else", days=3)
    for name, ca in (
        ("device-ca", device_ca),
        ("operator-ca", operator_ca),
        ("claim-ca", claim_ca),
    ):
        pki.write_certificate(directory / f"{name}.crt", ca.certificate)
    _issue(directory, device_ca, "broker", server_names=["127.0.0.1", "localhost"], client=False)
    for name in devices:
        _issue(directory, device_ca, name)
    _issue(directory, operator_ca, "controller")
    _issue(directory, claim_ca, "claim")
    (directory / "stranger").mkdir()
    _issue(directory / "stranger", stranger_ca, "dev1")
    files = FleetBrokerFiles(
        certfile=directory / "broker.crt",
        keyfile=directory / "broker.key",
        device_cafile=directory / "device-ca.crt",
        crlfile=directory / "crl.pem",
        operator_cafile=directory / "operator-ca.crt",
        claim_cafile=directory / "claim-ca.crt",
        device_acl=directory / "devices.acl",
        operator_acl=directory / "operators.acl",
        claim_acl=directory / "claim.acl",
    )
    (directory / "devices.acl").write_text(render_device_acl(ROOT))
    (directory / "operators.acl").write_text(render_operator_acl(ROOT, ["controller"]))
    (directory / "claim.acl").write_text(render_claim_acl(ROOT))
    fleet = FleetPki(directory, device_ca, files)
    fleet.write_crl([])
    return fleet


@dataclass(frozen=True)
class FleetBroker:
    """A running fleet broker and its three ports."""

    mosquitto: Mosquitto
    device_port: int
    claim_port: int
    operator_port: int


@contextmanager
def run_fleet_broker(workdir: Path, fleet: FleetPki) -> Iterator[FleetBroker]:
    """Mosquitto on the fleet's three listeners, no anonymous access, on free ports."""
    ports = [free_port() for _ in range(3)]
    listeners = fleet_listeners(
        fleet.files,
        bind_address="127.0.0.1",
        device_port=ports[0],
        claim_port=ports[1],
        operator_port=ports[2],
    )
    overrides = {"listeners": listeners, "allow_anonymous": False}
    with Mosquitto(workdir, settings_overrides=overrides) as broker:
        yield FleetBroker(broker, *ports)
