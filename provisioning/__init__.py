"""Device identities, certificates, enrollment and broker configuration."""

from .mosquitto import (
    BrokerListener,
    MosquittoSettings,
    TlsFiles,
    render_acl,
    render_mosquitto_conf,
)

__all__: list[str] = [
    "BrokerListener",
    "MosquittoSettings",
    "TlsFiles",
    "render_acl",
    "render_mosquitto_conf",
]
