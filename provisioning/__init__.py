"""Device identities, certificates, enrollment and broker configuration."""

__all__: list[str] = []
