"""A fleet's identities on disk: the offline directory ``edgefleet provision init`` writes.

::

    DIR/                         0700, like every directory below
      fleet.yaml                 FleetSettings: topic root, broker names and ports, names, lifetimes
      operator.yaml              an operator profile (ops.profile) for the controller identity
      ca/ca.crt ca.key           the device CA (devices, and the broker's server certificate)
      ca/crl.pem                 its revocation list (the devices' listener checks it)
      ca/issued.json             the ledger: every certificate any of the three CAs issued
      operator-ca/ca.crt ca.key crl.pem   the CA of the controller, enrollment service, operators
      claim-ca/ca.crt ca.key     the CA of the shared claim certificate
      claim/claim.crt claim.key  the claim certificate every unenrolled device holds
      broker/broker.crt broker.key   the broker's server certificate (SANs: the broker names)
      operators/controller.crt .key  the controller (enroll.crt .key: the enrollment service)
      keys/root.key root.pub     the offline root signing key (ed25519)
      keys/release-1.key .pub    the first release signing key
      keys/keyset.json           the root-signed set of trusted release keys (keyset)
      enroll/                    enrollment tokens (enrollment)
      devices/NAME/              offline device bundles (FleetDir.issue_device)

Private keys are 0600, directories 0700. ``init`` builds the whole tree beside ``DIR`` and
renames it into place, so a fleet directory is complete or absent. Every change of the
ledger (issuing, revoking) holds an exclusive lock on ``ca/.lock``: the enrollment service
and the CLI may sign and revoke at the same time.

Errors (all bad input: exit 2 on the command line)::

    PkiError (pki)
    └── FleetDirError          root of this module's errors
        ├── FleetExists        init over an existing fleet or a non-empty directory
        ├── NotAFleet          a directory without the files of a fleet
        ├── AlreadyIssued      a name with a live certificate, or a bundle in the way
        └── NotIssued          revoke of a name with no live certificate

No threads; functions are called from one thread per process (the lock covers processes).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.agent.protocol import TOPIC_LEVEL_PATTERN, TOPIC_ROOT, describe_errors

from . import pki
from .keyset import new_key_set, sign_key_set, write_key_set
from .mosquitto import CLAIM_PORT, CONTROLLER_IDENTITY, DEVICE_PORT, OPERATOR_PORT
from .signing import generate_signing_key, load_private_key, load_public_key

ENROLL_IDENTITY = "enroll"
"""CN of the enrollment service's certificate (from the operator CA)."""
DEVICE_INSTALL_DIR = PurePosixPath("/etc/edgefleet/identity")
"""Where a device bundle's fixed files go on the device; the starter agent.yaml names them."""
DEVICE_STATE_DIR = PurePosixPath("/var/lib/edgefleet/identity")
"""Where the device's key and certificate go: renewal rewrites them, and the agent's
systemd unit lets it write under /var/lib/edgefleet only."""
FIRST_RELEASE_KEY = "release-1"
DEFAULT_BROKER_NAMES = ("localhost", "127.0.0.1")

CertificateKind = Literal["ca", "broker", "operator", "claim", "device"]
Authority = Literal["device", "operator", "claim"]
_REVOCABLE: frozenset[str] = frozenset({"device", "operator"})
_LEDGER_MODE = pki.PUBLIC_FILE_MODE
_CRL_BACKDATE = datetime.timedelta(minutes=5)


class FleetDirError(pki.PkiError):
    """Root of the fleet directory's errors."""


class FleetExists(FleetDirError):
    """``init`` was pointed at an existing fleet, or at a directory that holds files."""


class NotAFleet(FleetDirError):
    """The directory lacks a file every fleet has, or one does not parse."""


class AlreadyIssued(FleetDirError):
    """The name holds a live certificate, or its bundle directory is in the way."""


class NotIssued(FleetDirError):
    """No live certificate of that name to revoke."""


class FleetSettings(BaseModel):
    """``fleet.yaml``: what every part of the fleet agrees on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic_root: str = Field(TOPIC_ROOT, description="Versioned topic root of every device.")
    broker_names: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BROKER_NAMES),
        min_length=1,
        description="Host names and addresses in the broker's certificate; the first is the "
        "one devices and operators connect to.",
    )
    device_port: int = Field(DEVICE_PORT, ge=1, le=65535, description="Devices' TLS listener.")
    claim_port: int = Field(CLAIM_PORT, ge=1, le=65535, description="Claim (enrollment) listener.")
    operator_port: int = Field(
        OPERATOR_PORT, ge=1, le=65535, description="Operators' TLS listener."
    )
    controller_identity: str = Field(CONTROLLER_IDENTITY, description="The controller's CN.")
    enroll_identity: str = Field(ENROLL_IDENTITY, description="The enrollment service's CN.")
    claim_identity: str = Field(
        pki.CLAIM_IDENTITY, description="The shared claim certificate's CN."
    )
    ca_days: int = Field(3650, ge=1, description="Lifetime of the three CAs, in days.")
    cert_days: int = Field(
        365, ge=1, description="Default lifetime of device and operator certificates, in days."
    )
    broker_days: int = Field(825, ge=1, description="Lifetime of the broker's certificate.")
    claim_days: int = Field(
        3650,
        ge=1,
        description="Lifetime of the shared claim certificate: it sits in every unenrolled "
        "image, maybe for years before first boot.",
    )
    crl_days: int = Field(
        3650,
        ge=1,
        description="How long each CRL is valid (next update). Mosquitto refuses every client "
        "once its CRL has expired, so it is long: a new CRL is written on every revocation.",
    )
    key_set_days: int = Field(365, ge=1, description="Lifetime of the first release-key set.")

    @property
    def broker_host(self) -> str:
        """The name clients connect to: the first broker name."""
        return self.broker_names[0]

    @field_validator("topic_root")
    @classmethod
    def _topic_root(cls, value: str) -> str:
        if not all(re.fullmatch(TOPIC_LEVEL_PATTERN, level) for level in value.split("/")):
            raise ValueError("must be topic levels of letters, digits, '_', '.', '-' joined by '/'")
        return value

    @field_validator("controller_identity", "enroll_identity", "claim_identity")
    @classmethod
    def _identity(cls, value: str) -> str:
        pki.check_identity(value, device=False)
        return value

    @field_validator("broker_names")
    @classmethod
    def _broker_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or any(c in name for c in " /\\\n\t") or not name.isprintable():
                raise ValueError(f"{name!r} is not a host name or address")
        return names


class IssuedCertificate(BaseModel):
    """One ledger entry: a certificate a fleet CA signed."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The certificate's CN.")
    kind: CertificateKind = Field(description="What it is for.")
    authority: Authority = Field(description="Which of the fleet's CAs signed it.")
    serial: str = Field(description="Serial number, lower-case hex.")
    not_after: datetime.datetime = Field(description="Expiry (UTC).")
    revoked_at: datetime.datetime | None = Field(None, description="When it was revoked.")

    @property
    def live(self) -> bool:
        """Not revoked and not expired."""
        return self.revoked_at is None and self.not_after > _now()


class Ledger(BaseModel):
    """``ca/issued.json``."""

    model_config = ConfigDict(extra="forbid")

    certificates: list[IssuedCertificate] = Field(default_factory=list)


class FleetDir:
    """A fleet directory: its paths, and issuing, signing and revoking under its CAs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._settings: FleetSettings | None = None

    def __repr__(self) -> str:
        return f"FleetDir({str(self.root)!r})"

    # -- paths -------------------------------------------------------------------------

    @property
    def settings_path(self) -> Path:
        """``fleet.yaml``."""
        return self.root / "fleet.yaml"

    @property
    def operator_profile(self) -> Path:
        """``operator.yaml``: the controller's operator profile."""
        return self.root / "operator.yaml"

    @property
    def ca_dir(self) -> Path:
        """The device CA's directory (also holds the ledger)."""
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        """The device CA's certificate: devices and operators verify the broker with it."""
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The device CA's private key."""
        return self.ca_dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        """The device CA's CRL, which the devices' listener checks."""
        return self.ca_dir / "crl.pem"

    @property
    def ledger_path(self) -> Path:
        """Every certificate issued, by every CA of the fleet."""
        return self.ca_dir / "issued.json"

    @property
    def operator_ca_dir(self) -> Path:
        """The operator CA's directory."""
        return self.root / "operator-ca"

    @property
    def operator_ca_cert(self) -> Path:
        """The operator CA's certificate (the operators' listener's cafile)."""
        return self.operator_ca_dir / "ca.crt"

    @property
    def operator_ca_key(self) -> Path:
        """The operator CA's private key."""
        return self.operator_ca_dir / "ca.key"

    @property
    def operator_crl_path(self) -> Path:
        """The operator CA's CRL."""
        return self.operator_ca_dir / "crl.pem"

    @property
    def claim_ca_dir(self) -> Path:
        """The claim CA's directory."""
        return self.root / "claim-ca"

    @property
    def claim_ca_cert(self) -> Path:
        """The claim CA's certificate (the claim listener's cafile)."""
        return self.claim_ca_dir / "ca.crt"

    @property
    def claim_ca_key(self) -> Path:
        """The claim CA's private key."""
        return self.claim_ca_dir / "ca.key"

    @property
    def claim_dir(self) -> Path:
        """The shared claim identity's directory."""
        return self.root / "claim"

    @property
    def claim_cert(self) -> Path:
        """The shared claim certificate."""
        return self.claim_dir / "claim.crt"

    @property
    def claim_key(self) -> Path:
        """The shared claim certificate's key."""
        return self.claim_dir / "claim.key"

    @property
    def broker_dir(self) -> Path:
        """The broker's identity."""
        return self.root / "broker"

    @property
    def broker_cert(self) -> Path:
        """The broker's server certificate."""
        return self.broker_dir / "broker.crt"

    @property
    def broker_key(self) -> Path:
        """The broker's private key."""
        return self.broker_dir / "broker.key"

    @property
    def operators_dir(self) -> Path:
        """Operator-CA identities: the controller, the enrollment service, operators."""
        return self.root / "operators"

    def operator_cert(self, name: str) -> Path:
        """The certificate of operator identity ``name``."""
        return self.operators_dir / f"{name}.crt"

    def operator_key(self, name: str) -> Path:
        """The private key of operator identity ``name``."""
        return self.operators_dir / f"{name}.key"

    @property
    def controller_cert(self) -> Path:
        """The controller's certificate."""
        return self.operator_cert(self.settings().controller_identity)

    @property
    def controller_key(self) -> Path:
        """The controller's private key."""
        return self.operator_key(self.settings().controller_identity)

    @property
    def keys_dir(self) -> Path:
        """Signing keys and the key set."""
        return self.root / "keys"

    @property
    def root_key(self) -> Path:
        """The offline root signing key."""
        return self.keys_dir / "root.key"

    @property
    def root_pub(self) -> Path:
        """The root's public key, which devices trust key sets by."""
        return self.keys_dir / "root.pub"

    @property
    def release_key(self) -> Path:
        """The first release signing key."""
        return self.keys_dir / f"{FIRST_RELEASE_KEY}.key"

    @property
    def release_pub(self) -> Path:
        """The first release key's public key."""
        return self.keys_dir / f"{FIRST_RELEASE_KEY}.pub"

    @property
    def keyset_path(self) -> Path:
        """The root-signed set of trusted release keys."""
        return self.keys_dir / "keyset.json"

    @property
    def enroll_dir(self) -> Path:
        """Enrollment state."""
        return self.root / "enroll"

    @property
    def tokens_path(self) -> Path:
        """Enrollment tokens (the enrollment module's format)."""
        return self.enroll_dir / "tokens.json"

    @property
    def devices_dir(self) -> Path:
        """Offline device bundles."""
        return self.root / "devices"

    def device_dir(self, name: str) -> Path:
        """The bundle of device ``name``."""
        return self.devices_dir / name

    # -- opening ---------------------------------------------------------------------------

    def settings(self) -> FleetSettings:
        """``fleet.yaml``, read once."""
        if self._settings is None:
            self._settings = _read_settings(self.settings_path)
        return self._settings

    @classmethod
    def load(cls, root: Path) -> FleetDir:
        """An existing fleet directory, checked: its settings parse and its CAs are there."""
        fleet = cls(root)
        if not fleet.root.is_dir():
            raise NotAFleet(
                f"{fleet.root}: no such fleet directory",
                hint="create one with 'edgefleet provision init DIR', or pass --fleet DIR "
                "(or set EDGEFLEET_FLEET)",
            )
        fleet.settings()
        for path in (
            fleet.ca_cert,
            fleet.ca_key,
            fleet.ledger_path,
            fleet.operator_ca_cert,
            fleet.operator_ca_key,
            fleet.claim_ca_cert,
        ):
            if not path.is_file():
                raise NotAFleet(
                    f"{fleet.root} is not a complete fleet directory: {path} is missing",
                    hint="restore it from the fleet's backup; 'edgefleet provision init' wrote it",
                )
        return fleet

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        broker_names: Sequence[str] = DEFAULT_BROKER_NAMES,
        topic_root: str = TOPIC_ROOT,
        ca_days: int = 3650,
        cert_days: int = 365,
        device_port: int = DEVICE_PORT,
        claim_port: int = CLAIM_PORT,
        operator_port: int = OPERATOR_PORT,
    ) -> FleetDir:
        """Create a new fleet in ``root`` (absent or an empty directory): everything at once."""
        root = Path(root).absolute()
        try:
            settings = FleetSettings(
                topic_root=topic_root,
                broker_names=list(broker_names),
                ca_days=ca_days,
                cert_days=cert_days,
                device_port=device_port,
                claim_port=claim_port,
                operator_port=operator_port,
            )
        except ValidationError as exc:
            raise FleetDirError(
                f"invalid fleet settings: {describe_errors(exc)}",
                hint="check --broker-name, --topic-root, the ports and the lifetimes",
            ) from None
        _check_free(root)
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.init-"))
        except OSError as exc:
            raise pki.PkiFileError(
                f"cannot create {root}: {exc.strerror or exc}",
                hint="choose a directory you can write to",
            ) from exc
        try:
            _Builder(FleetDir(staging), FleetDir(root), settings).build()
            os.chmod(staging, pki.PRIVATE_DIR_MODE)
            try:
                os.rename(staging, root)  # replaces an empty directory, nothing else
            except OSError as exc:
                raise FleetExists(
                    f"{root} appeared or filled while the fleet was made; nothing was changed",
                    hint="choose another directory",
                ) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.load(root)

    # -- the ledger ------------------------------------------------------------------------

    def ledger(self) -> Ledger:
        """Every certificate issued so far."""
        return _read_ledger(self.ledger_path)

    def live_certificates(self, name: str) -> list[IssuedCertificate]:
        """The certificates of ``name`` that are neither revoked nor expired."""
        return [e for e in self.ledger().certificates if e.name == name and e.live]

    def operator_identities(self) -> list[str]:
        """Names of operator-CA identities with a live certificate (the operators' ACL)."""
        names = (e.name for e in self.ledger().certificates if e.kind == "operator" and e.live)
        return list(dict.fromkeys(names))

    # -- issuing ---------------------------------------------------------------------------

    def issue_device(
        self,
        name: str,
        *,
        days: int | None = None,
        out: Path | None = None,
        replace: bool = False,
    ) -> Path:
        """An offline bundle for device ``name`` in ``out`` (default ``devices/NAME``).

        The device's key is made here (the factory path; enrollment makes it on the
        device). ``replace`` revokes the name's live certificates and replaces its bundle;
        without it either one refuses. Returns the bundle directory.
        """
        self._check_device_name(name)
        days = self._days(days)
        bundle = Path(out) if out is not None else self.device_dir(name)
        with self._locked():
            ledger = self.ledger()
            live = [e for e in ledger.certificates if e.name == name and e.live]
            if live and not replace:
                raise AlreadyIssued(
                    f"{name!r} already holds a live certificate (serial {live[0].serial})",
                    hint=f"revoke it first ('edgefleet provision revoke {name}'), or pass "
                    "--replace to revoke it and issue a new bundle",
                )
            if _holds_files(bundle) and not replace:
                raise AlreadyIssued(
                    f"{bundle} exists and holds files; refusing to overwrite a bundle",
                    hint="choose another --out, remove it, or pass --replace",
                )
            if bundle.parent == self.devices_dir:
                pki.make_private_dir(bundle.parent)
            elif not bundle.parent.is_dir():
                raise pki.PkiFileError(
                    f"{bundle.parent}: no such directory", hint="create it, or choose another --out"
                )
            staging = Path(tempfile.mkdtemp(dir=bundle.parent, prefix=f".{bundle.name}.new-"))
            try:
                certificate = self._write_bundle(staging, name, days)
                self._revoke_entries(live)
                ledger.certificates.append(_entry(certificate, "device", "device"))
                self._save(ledger, crl_changed=bool(live))
                _swap_into_place(staging, bundle)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return bundle

    def issue_operator(self, name: str, *, days: int | None = None) -> Path:
        """A certificate from the operator CA for ``name`` in ``operators/``; its cert path."""
        pki.check_identity(name, device=False)
        if name == self.settings().claim_identity:
            raise pki.InvalidIdentity(
                f"{name!r} is the claim identity", hint="choose another operator name"
            )
        with self._locked():
            ledger = self.ledger()
            live = [e for e in ledger.certificates if e.name == name and e.live]
            if live or self.operator_cert(name).exists():
                raise AlreadyIssued(
                    f"{name!r} already has an operator certificate",
                    hint=f"revoke it first ('edgefleet provision revoke {name}')",
                )
            ca = pki.load_ca(self.operator_ca_cert, self.operator_ca_key)
            certificate = _write_identity(
                ca, self.operator_cert(name), self.operator_key(name), name, self._days(days)
            )
            ledger.certificates.append(_entry(certificate, "operator", "operator"))
            self._save(ledger)
        return self.operator_cert(name)

    def sign_device_csr(
        self, csr_pem: bytes, name: str, *, days: int | None = None
    ) -> x509.Certificate:
        """A device certificate for the key in ``csr_pem``, named ``name``, in the ledger.

        For enrollment and renewal: the caller has checked that ``name`` is the one to sign
        (a token bound to it, or the connection's own identity); a name that already holds
        a live certificate is signed again (a renewal), see :meth:`live_certificates`.
        """
        self._check_device_name(name)
        ca = pki.load_ca(self.ca_cert, self.ca_key)
        certificate = pki.sign_csr(ca, csr_pem, name, days=self._days(days))
        with self._locked():
            ledger = self.ledger()
            ledger.certificates.append(_entry(certificate, "device", "device"))
            self._save(ledger)
        return certificate

    # -- revoking --------------------------------------------------------------------------

    def revoke(self, name: str) -> list[IssuedCertificate]:
        """Revoke every unrevoked device or operator certificate of ``name``; new CRLs.

        Returns the entries revoked. The broker reads the CRL again on SIGHUP.
        """
        with self._locked():
            ledger = self.ledger()
            mine = [e for e in ledger.certificates if e.name == name and e.revoked_at is None]
            if any(e.kind not in _REVOCABLE for e in mine):
                kind = next(e.kind for e in mine if e.kind not in _REVOCABLE)
                raise NotIssued(
                    f"{name!r} is the fleet's {kind} certificate, which is not revoked by name",
                    hint="only device and operator certificates are revoked this way",
                )
            if not mine:
                known = any(e.name == name for e in ledger.certificates)
                raise NotIssued(
                    f"{name!r} holds no unrevoked certificate"
                    + (" (every one is revoked already)" if known else " (never issued here)"),
                    hint="'edgefleet provision list' shows every certificate issued",
                )
            self._revoke_entries(mine)
            self._save(ledger, crl_changed=True)
        return mine

    def refresh_crls(self) -> None:
        """Write both CRLs again from the ledger: after a failed write, or before they expire."""
        with self._locked():
            self._write_crls(self.ledger())

    # -- internals -------------------------------------------------------------------------

    def _days(self, days: int | None) -> int:
        if days is None:
            return self.settings().cert_days
        if days < 1:
            raise FleetDirError(f"a lifetime of {days} days", hint="give at least 1 day")
        return days

    def _check_device_name(self, name: str) -> None:
        pki.check_identity(name)
        settings = self.settings()
        own = {settings.controller_identity, settings.enroll_identity, settings.claim_identity}
        if name in own:
            raise pki.InvalidIdentity(
                f"{name!r} is one of this fleet's own identities", hint="choose another name"
            )

    def _write_bundle(self, directory: Path, name: str, days: int) -> x509.Certificate:
        ca = pki.load_ca(self.ca_cert, self.ca_key)
        certificate = _write_identity(
            ca, directory / "device.crt", directory / "device.key", name, days
        )
        for source, target in (
            (self.ca_cert, "ca.crt"),
            (self.root_pub, "root.pub"),
            (self.keyset_path, "keyset.json"),
        ):
            pki.write_file(directory / target, source.read_bytes(), mode=pki.PUBLIC_FILE_MODE)
        text = starter_agent_config(name, self.settings())
        pki.write_file(directory / "agent.yaml", text.encode(), mode=pki.PUBLIC_FILE_MODE)
        return certificate

    @staticmethod
    def _revoke_entries(entries: list[IssuedCertificate]) -> None:
        now = _now()
        for entry in entries:
            entry.revoked_at = now

    def _save(self, ledger: Ledger, *, crl_changed: bool = False) -> None:
        # The ledger first: it is what every CRL is made from, so a CRL never lists a
        # revocation the ledger lacks (the next CRL would forget it).
        _write_ledger(self.ledger_path, ledger, replace=True)
        if crl_changed:
            self._write_crls(ledger)

    def _write_crls(self, ledger: Ledger) -> None:
        authorities: list[tuple[Authority, Path, Path, Path]] = [
            ("device", self.ca_cert, self.ca_key, self.crl_path),
            ("operator", self.operator_ca_cert, self.operator_ca_key, self.operator_crl_path),
        ]
        for authority, ca_cert, ca_key, crl in authorities:
            _write_crl(pki.load_ca(ca_cert, ca_key), ledger, authority, crl, self.settings())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.ca_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise NotAFleet(
                f"cannot open the ledger lock in {self.ca_dir}: {exc.strerror or exc}",
                hint="pass the fleet directory 'edgefleet provision init' made",
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class _Builder:
    """Writes a new fleet into ``stage``; ``final`` names where it will live."""

    def __init__(self, stage: FleetDir, final: FleetDir, settings: FleetSettings) -> None:
        self.stage = stage
        self.final = final
        self.settings = settings
        self.ledger = Ledger()

    def build(self) -> None:
        stage, settings = self.stage, self.settings
        stage._settings = settings
        for directory in (
            stage.ca_dir,
            stage.operator_ca_dir,
            stage.claim_ca_dir,
            stage.claim_dir,
            stage.broker_dir,
            stage.operators_dir,
            stage.keys_dir,
            stage.enroll_dir,
            stage.devices_dir,
        ):
            pki.make_private_dir(directory)
        device_ca = self._ca("edgefleet devices", stage.ca_cert, stage.ca_key, "device")
        operator_ca = self._ca(
            "edgefleet operators", stage.operator_ca_cert, stage.operator_ca_key, "operator"
        )
        claim_ca = self._ca("edgefleet claim", stage.claim_ca_cert, stage.claim_ca_key, "claim")
        broker_key = pki.generate_key()
        broker = pki.issue_certificate(
            device_ca,
            broker_key.public_key(),
            settings.broker_host,
            days=settings.broker_days,
            server_names=settings.broker_names,
            client=False,
        )
        pki.write_private_key(stage.broker_key, broker_key)
        pki.write_certificate(stage.broker_cert, broker)
        self._record(broker, "broker", "device")
        for name in (settings.controller_identity, settings.enroll_identity):
            certificate = _write_identity(
                operator_ca,
                stage.operator_cert(name),
                stage.operator_key(name),
                name,
                settings.cert_days,
            )
            self._record(certificate, "operator", "operator")
        claim = _write_identity(
            claim_ca,
            stage.claim_cert,
            stage.claim_key,
            settings.claim_identity,
            settings.claim_days,
        )
        self._record(claim, "claim", "claim")
        self._keys()
        authorities: list[tuple[Authority, pki.Issued, Path]] = [
            ("device", device_ca, stage.crl_path),
            ("operator", operator_ca, stage.operator_crl_path),
        ]
        for authority, ca, crl in authorities:
            _write_crl(ca, self.ledger, authority, crl, settings, replace=False)
        _write_ledger(stage.ledger_path, self.ledger, replace=False)
        self._profiles()

    def _ca(self, title: str, cert: Path, key: Path, authority: Authority) -> pki.Issued:
        ca = pki.create_ca(title, days=self.settings.ca_days)
        assert ca.key is not None
        pki.write_private_key(key, ca.key)
        pki.write_certificate(cert, ca.certificate)
        self._record(ca.certificate, "ca", authority)
        return ca

    def _record(self, certificate: x509.Certificate, kind: CertificateKind, by: Authority) -> None:
        self.ledger.certificates.append(_entry(certificate, kind, by))

    def _keys(self) -> None:
        stage = self.stage
        generate_signing_key(stage.keys_dir, "root")
        generate_signing_key(stage.keys_dir, FIRST_RELEASE_KEY)
        key_set = new_key_set(
            [load_public_key(stage.release_pub)],
            days=self.settings.key_set_days,
            names=[FIRST_RELEASE_KEY],
        )
        write_key_set(stage.keyset_path, sign_key_set(key_set, load_private_key(stage.root_key)))

    def _profiles(self) -> None:
        settings, final = self.settings, self.final
        fleet_text = (
            "# The fleet's settings, written by 'edgefleet provision init'.\n"
            + yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
        )
        pki.write_file(self.stage.settings_path, fleet_text.encode(), mode=pki.PUBLIC_FILE_MODE)
        profile = {
            "host": settings.broker_host,
            "port": settings.operator_port,
            "topic_root": settings.topic_root,
            "cafile": str(final.ca_cert),
            "certfile": str(final.operator_cert(settings.controller_identity)),
            "keyfile": str(final.operator_key(settings.controller_identity)),
        }
        profile_text = (
            "# Operator profile for the controller identity, written by 'edgefleet provision "
            "init'.\n# Copy it to ~/.config/edgefleet/operator.yaml or pass --profile.\n"
            + yaml.safe_dump(profile, sort_keys=False)
        )
        pki.write_file(
            self.stage.operator_profile, profile_text.encode(), mode=pki.PUBLIC_FILE_MODE
        )


def starter_agent_config(name: str, settings: FleetSettings) -> str:
    """The starter ``agent.yaml`` of a device bundle: TLS and trust files where installed."""
    installed = DEVICE_INSTALL_DIR
    config: dict[str, Any] = {
        "device_id": name,
        "broker": {
            "host": settings.broker_host,
            "port": settings.device_port,
            "topic_root": settings.topic_root,
            "tls": {
                "cafile": str(installed / "ca.crt"),
                "certfile": str(DEVICE_STATE_DIR / "device.crt"),
                "keyfile": str(DEVICE_STATE_DIR / "device.key"),
            },
        },
        "streams": [
            {
                "name": "camera",
                "source": {"type": "v4l2", "device": "/dev/video0"},
                "model": {"path": "/var/lib/edgefleet/models/model.tflite"},
            }
        ],
        "updates": {
            "trusted_keys": [],
            "root_key": str(installed / "root.pub"),
            "key_set": str(installed / "keyset.json"),
        },
    }
    header = (
        f"# Starter agent configuration of device {name}, written by "
        "'edgefleet provision device'.\n"
        "# The paths name where the bundle is installed: copy device.key and device.crt to\n"
        f"# {DEVICE_STATE_DIR}/ (device.key mode 0600, owned by the agent's user: renewal\n"
        f"# rewrites both), the other files to {installed}/ and this file to\n"
        "# /etc/edgefleet/agent/agent.yaml.\n# Replace the stream below with the device's own\n"
        "# cameras and models, then: edgefleet-agent check-config --config agent.yaml\n"
        "# Manifests verify against the root-signed release-key set (updates.key_set);\n"
        "# updates.trusted_keys stays empty.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


# -- files -------------------------------------------------------------------------------


def _write_identity(
    ca: pki.Issued, cert_path: Path, key_path: Path, name: str, days: int
) -> x509.Certificate:
    key = pki.generate_key()
    certificate = pki.issue_certificate(ca, key.public_key(), name, days=days)
    pki.write_private_key(key_path, key)
    pki.write_certificate(cert_path, certificate)
    return certificate


def _entry(
    certificate: x509.Certificate, kind: CertificateKind, authority: Authority
) -> IssuedCertificate:
    return IssuedCertificate(
        name=pki.common_name(certificate),
        kind=kind,
        authority=authority,
        serial=format(certificate.serial_number, "x"),
        not_after=certificate.not_valid_after_utc,
    )


def _write_crl(
    ca: pki.Issued,
    ledger: Ledger,
    authority: Authority,
    path: Path,
    settings: FleetSettings,
    *,
    replace: bool = True,
) -> None:
    revoked = [
        (int(e.serial, 16), e.revoked_at)
        for e in ledger.certificates
        if e.authority == authority and e.revoked_at is not None and e.kind != "ca"
    ]
    # A CRL dated after the broker's clock refuses every client ("CRL is not yet valid"),
    # so it is dated a little early, as certificates are. Mosquitto adds the CRL it reads
    # on SIGHUP beside the one it holds, and OpenSSL uses the one with the later lastUpdate
    # (the first loaded on a tie): each new CRL is at least a second later than the last.
    moment = _now() - _CRL_BACKDATE
    if path.exists():
        previous = x509.load_pem_x509_crl(path.read_bytes()).last_update_utc
        moment = max(moment, previous + datetime.timedelta(seconds=1))
    crl = pki.make_crl(ca, revoked, next_update_days=settings.crl_days, now=moment)
    pki.write_file(path, crl, mode=pki.PUBLIC_FILE_MODE, replace=replace)


def _read_ledger(path: Path) -> Ledger:
    try:
        return Ledger.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise NotAFleet(
            f"{path}: no such ledger", hint="pass a directory 'edgefleet provision init' made"
        ) from None
    except ValidationError as exc:
        raise NotAFleet(
            f"{path} is not a certificate ledger: {describe_errors(exc)}",
            hint="restore it from the fleet's backup",
        ) from None


def _write_ledger(path: Path, ledger: Ledger, *, replace: bool) -> None:
    data = (ledger.model_dump_json(indent=2) + "\n").encode()
    pki.write_file(path, data, mode=_LEDGER_MODE, replace=replace)


def _read_settings(path: Path) -> FleetSettings:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotAFleet(
            f"{path.parent} is not a fleet directory: no fleet.yaml",
            hint="create one with 'edgefleet provision init DIR', or pass the right --fleet",
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise NotAFleet(f"cannot read {path}: {exc}", hint="restore it from a backup") from exc
    try:
        return FleetSettings.model_validate(data)
    except ValidationError as exc:
        raise NotAFleet(
            f"{path}: {describe_errors(exc)}", hint="fix the fields named, or restore the file"
        ) from None


def _check_free(root: Path) -> None:
    if (root / "fleet.yaml").exists() or (root / "ca").exists():
        raise FleetExists(
            f"{root} already holds a fleet; refusing to overwrite it (its CAs sign every "
            "device's certificate)",
            hint="choose another directory; 'edgefleet provision device' adds devices to this one",
        )
    if root.exists() and not root.is_dir():
        raise FleetExists(f"{root} exists and is not a directory", hint="choose another path")
    if _holds_files(root):
        raise FleetExists(
            f"{root} is not empty; a fleet gets a directory of its own",
            hint="choose a new or empty directory",
        )


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _swap_into_place(staging: Path, bundle: Path) -> None:
    """Rename ``staging`` to ``bundle``; an old bundle there is moved aside, then removed."""
    os.chmod(staging, pki.PRIVATE_DIR_MODE)
    old: Path | None = None
    if _holds_files(bundle):
        old = Path(tempfile.mkdtemp(dir=bundle.parent, prefix=f".{bundle.name}.old-"))
        os.rename(bundle, old / "bundle")
    try:
        os.rename(staging, bundle)
    except OSError as exc:
        raise pki.PkiFileError(
            f"cannot put the bundle at {bundle}: {exc.strerror or exc}",
            hint="check that nothing else writes there",
        ) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
