"""User-facing errors: the command lines print their message on one line and exit, no traceback."""


class MTLError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class DataError(MTLError):
    """Bad data: a missing column, a missing photo, an unreadable image, ..."""


class ConfigError(MTLError):
    """Bad configuration: an unknown key or model name, a value out of range, ..."""
