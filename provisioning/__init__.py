"""Device identities, certificates, enrollment, broker configuration and manifest signing."""

from .mosquitto import (
    BrokerListener,
    MosquittoSettings,
    TlsFiles,
    render_acl,
    render_mosquitto_conf,
)
from .signing import (
    BadSignature,
    KeyFileError,
    MalformedManifest,
    SigningError,
    TrustedKeys,
    UnknownSigningKey,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    sign_manifest,
)

__all__: list[str] = [
    "BadSignature",
    "BrokerListener",
    "KeyFileError",
    "MalformedManifest",
    "MosquittoSettings",
    "SigningError",
    "TlsFiles",
    "TrustedKeys",
    "UnknownSigningKey",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "render_acl",
    "render_mosquitto_conf",
    "sign_manifest",
]
