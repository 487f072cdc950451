def main() -> int:
    from armguard.detectors import __all__ as a
    print("ok", a)
    return 0
