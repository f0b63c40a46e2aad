"""The device daemon (``edgefleet-agent``): cameras to inference to MQTT events."""

__all__: list[str] = []
