"""armguard daemon."""

__all__: list[str] = []
