"""Pure statistics for armguard."""
__all__: list[str] = []
