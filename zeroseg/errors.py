"""Exception hierarchy: every error a user can fix names the file, class or key and the fix."""


class ZerosegError(Exception):
    """Base class of errors raised for bad input or configuration (reported without traceback)."""


class DataError(ZerosegError, ValueError):
    """Bad dataset input: corrupt image, missing label, label value outside the class list, ..."""


class ConfigError(ZerosegError, ValueError):
    """Bad configuration: unknown key, unknown class name, inconsistent settings, ..."""
