"""The fleet controller and the operator CLI (``edgefleet``)."""

__all__: list[str] = []
