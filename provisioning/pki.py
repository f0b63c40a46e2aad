"""The fleet's X.509 pieces: CAs, certificates, CSRs and CRLs, with PyCA ``cryptography``.

TLS keys are ECDSA P-256: every TLS stack a fleet meets (OpenSSL under Mosquitto and
Python, mbedTLS on microcontrollers) speaks it, where ed25519 certificates are still
patchy. Manifest and key-set signatures use ed25519 (``signing``, ``keyset``).

Identities: a certificate's CN becomes the MQTT username (``use_identity_as_username``)
and the ACL grants by it, so only names that match :data:`IDENTITY_PATTERN` are ever
signed (:func:`check_identity`): Mosquitto 2.0 lets a CN containing ``/`` escape a ``%u``
pattern. Names the fleet keeps for itself (:data:`RESERVED_IDENTITIES`) are refused for
devices.

Files: private keys are written 0600 (:func:`write_private_key`), everything is written
whole or not at all (a temporary file, fsync, rename), and an existing file is replaced
only when the caller says so.

Errors::

    EdgefleetError
    └── PkiError                 root of this module's errors
        ├── InvalidIdentity      a name that must never be signed (bad input)
        ├── BadRequest           a CSR that does not parse or whose signature fails (bad input)
        └── PkiFileError         a PEM file missing, unreadable, of the wrong kind, or in the way

Pure functions over keys and certificates, plus small file helpers; no threads.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.runtime import EdgefleetError

from .mosquitto import CONTROLLER_IDENTITY, IDENTITY_PATTERN

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
CLAIM_IDENTITY = "claim"
"""Default CN of the shared claim certificate that unenrolled devices connect with."""
RESERVED_IDENTITIES = frozenset({CONTROLLER_IDENTITY, CLAIM_IDENTITY, "broker", "enroll"})
"""Names no device may have: the fleet's own identities."""

CertificateKey = ec.EllipticCurvePrivateKey
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # not-before a little early: boards' clocks drift


class PkiError(EdgefleetError):
    """Root of the certificate errors."""


class InvalidIdentity(PkiError):
    """A name that must never be signed into a certificate."""


class BadRequest(PkiError):
    """A certificate signing request that does not parse or whose signature does not verify."""


class PkiFileError(PkiError):
    """A PEM file is missing, unreadable, holds the wrong kind of object, or is in the way."""


def check_identity(name: str, *, device: bool = True) -> str:
    """``name`` when it may be a certificate identity; :class:`InvalidIdentity` otherwise.

    ``device``: also refuse the fleet's own names (:data:`RESERVED_IDENTITIES`).
    """
    if not re.fullmatch(IDENTITY_PATTERN, name):
        shown = name if name.isprintable() else ascii(name)
        raise InvalidIdentity(
            f"{shown!r} cannot be a device or client identity: it must be 1 to 64 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit (no '/', '+', '#', '$', "
            "spaces or control characters: they would escape the broker's per-identity ACL)",
            hint="choose a name such as 'shop-0042' or 'cam.front-1'",
        )
    if device and name in RESERVED_IDENTITIES:
        raise InvalidIdentity(
            f"{name!r} is one of the fleet's own identities "
            f"({', '.join(sorted(RESERVED_IDENTITIES))})",
            hint="choose another device name",
        )
    return name


def generate_key() -> CertificateKey:
    """A new P-256 key for a TLS certificate."""
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Issued:
    """A certificate just signed, and the key it certifies when this side made it."""

    certificate: x509.Certificate
    key: CertificateKey | None = None


def create_ca(common_name: str, *, days: int, now: datetime.datetime | None = None) -> Issued:
    """A self-signed CA that signs certificates and CRLs, and nothing below another CA."""
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now(now) - _CLOCK_SKEW
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue_certificate(
    ca: Issued,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    *,
    days: int,
    server_names: Sequence[str] = (),
    client: bool = True,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A certificate from ``ca`` for ``public_key`` under ``common_name``.

    ``server_names`` (host names or IP addresses) make it a TLS server certificate with
    those subject alternative names; ``client`` makes it a TLS client certificate.
    """
    if ca.key is None:
        raise PkiError("the CA's private key is needed to sign", hint="load the CA with its key")
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    if not usages:
        raise PkiError(
            "a certificate for neither a server nor a client", hint="give server names or client"
        )
    start = _now(now) - _CLOCK_SKEW
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + datetime.timedelta(days=days), _expiry(ca.certificate)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value), False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in server_names]), False
        )
    return builder.sign(ca.key, hashes.SHA256())


def make_csr(key: CertificateKey, common_name: str) -> bytes:
    """A PEM certificate signing request for ``key``; the signer decides the final name."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def sign_csr(
    ca: Issued,
    csr_pem: bytes,
    common_name: str,
    *,
    days: int,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A client certificate for the key in ``csr_pem``, named ``common_name`` by the signer.

    The request's own subject is ignored: the name comes from what the signer checked (an
    enrollment token, or the identity of the connection that asked for a renewal).
    """
    check_identity(common_name)
    try:
        request = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise BadRequest(
            f"the certificate signing request does not parse ({exc})",
            hint="send a PEM CSR as the agent makes it",
        ) from exc
    if not request.is_signature_valid:
        raise BadRequest(
            "the certificate signing request's signature does not verify",
            hint="the request was altered on the way; make a new one",
        )
    public_key = request.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise BadRequest(
            f"the request's key is a {type(public_key).__name__}, not an ECDSA P-256 key",
            hint="make the device key with edgefleet (P-256)",
        )
    return issue_certificate(ca, public_key, common_name, days=days, now=now)


def make_crl(
    ca: Issued,
    revoked: Iterable[tuple[int, datetime.datetime]],
    *,
    next_update_days: int,
    now: datetime.datetime | None = None,
) -> bytes:
    """A PEM CRL from ``ca`` listing each (serial number, revocation time) in ``revoked``."""
    if ca.key is None:
        raise PkiError("the CA's private key is needed to sign", hint="load the CA with its key")
    start = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(start)
        .next_update(start + datetime.timedelta(days=next_update_days))
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def common_name(certificate: x509.Certificate) -> str:
    """The certificate's CN (its identity on the broker)."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise PkiError("the certificate has no common name", hint="issue it with edgefleet")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def days_to_expiry(certificate: x509.Certificate, now: datetime.datetime | None = None) -> float:
    """Days until ``certificate`` expires; negative once it has."""
    return (_expiry(certificate) - _now(now)).total_seconds() / 86400


def is_issued_by(certificate: x509.Certificate, ca_certificate: x509.Certificate) -> bool:
    """Whether ``ca_certificate`` signed ``certificate``."""
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


# Files.


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: CertificateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (it lives in a 0600 file, not in transit)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_file(path: Path, data: bytes, *, mode: int, replace: bool = False) -> None:
    """Write ``data`` to ``path`` whole, with ``mode``: a temporary file, fsync, rename.

    Without ``replace`` an existing ``path`` is left alone and :class:`PkiFileError` raised.
    """
    if not replace and path.exists():
        raise PkiFileError(
            f"{path} exists; refusing to overwrite it", hint="remove it or choose another place"
        )
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)  # exact, whatever the umask
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if replace:
                os.replace(temporary, path)
            else:
                os.link(temporary, path)  # fails if path appeared since the check
                os.unlink(temporary)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)
    except FileExistsError as exc:
        raise PkiFileError(
            f"{path} appeared while it was written; nothing was overwritten",
            hint="remove it or choose another place",
        ) from exc
    except OSError as exc:
        raise PkiFileError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="check the directory exists and is writable, and the free space",
        ) from exc


def write_private_key(
    path: Path, key: CertificateKey | ed25519.Ed25519PrivateKey, *, replace: bool = False
) -> None:
    """Write ``key`` to ``path``, mode 0600."""
    write_file(path, private_key_pem(key), mode=PRIVATE_KEY_MODE, replace=replace)


def write_certificate(path: Path, certificate: x509.Certificate, *, replace: bool = False) -> None:
    """Write ``certificate`` to ``path`` as PEM, mode 0644."""
    write_file(path, certificate_pem(certificate), mode=PUBLIC_FILE_MODE, replace=replace)


def key_mode_problem(path: Path, user: str) -> str | None:
    """Why ``user`` must not use the private key at ``path`` (group or others may read or
    write it), or None (it is the owner's alone, or not there)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at {path} ({exc.strerror or exc})"
    if mode & 0o077 == 0:
        return None
    return (
        f"the private key {path} is readable or writable by group or others (mode "
        f"{mode:04o}); {user} refuses to use it: run chmod 600 {path}"
    )


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) with mode 0700; an existing one is narrowed to it."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        path.chmod(PRIVATE_DIR_MODE)
    except OSError as exc:
        raise PkiFileError(
            f"cannot create {path}: {exc.strerror or exc}", hint="check the parent's permissions"
        ) from exc


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate in the PEM file at ``path``."""
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiFileError(
            f"{path} holds no PEM certificate ({exc})", hint="pass a .crt file edgefleet wrote"
        ) from exc


def load_certificate_key(path: Path) -> CertificateKey:
    """The P-256 private key in the PEM file at ``path``."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiFileError(
            f"{path} holds no unencrypted PEM private key ({exc})",
            hint="pass a .key file edgefleet wrote",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiFileError(
            f"{path} holds a {type(key).__name__}, not an ECDSA key",
            hint="certificate keys are ECDSA P-256; pass a .key file edgefleet wrote",
        )
    return key


def load_ca(certificate_path: Path, key_path: Path | None = None) -> Issued:
    """A CA's certificate, and its key when ``key_path`` is given (to sign with)."""
    certificate = load_certificate(certificate_path)
    key = load_certificate_key(key_path) if key_path is not None else None
    if key is not None and key.public_key() != certificate.public_key():
        raise PkiFileError(
            f"{key_path} is not the key of {certificate_path}", hint="pass the CA's own key"
        )
    return Issued(certificate, key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiFileError(f"{path}: no such file", hint="check the path") from None
    except OSError as exc:
        raise PkiFileError(
            f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions"
        ) from exc


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _expiry(certificate: x509.Certificate) -> datetime.datetime:
    return certificate.not_valid_after_utc


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)
