"""Functions mitogen children call. Kept free of imports: mitogen ships this module to the child."""


def noop() -> None:
    """Do nothing; the no-op call round trip measures only the RPC machinery."""
    return None
