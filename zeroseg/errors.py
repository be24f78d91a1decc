"""Exception hierarchy: every error a user can fix names the file, class or key and the fix."""


class ZerosegError(Exception):
    """Base class of errors raised for bad input or configuration (reported without traceback)."""


class DataError(ZerosegError, ValueError):
    """Bad dataset input: corrupt image, missing label, label value outside the class list, ..."""


class BadImageError(DataError):
    """One image file cannot be used (missing, corrupt, truncated, or its size disagrees with its
    annotation/label). ``build_splits.on_bad_image: skip`` skips such images (counted in
    ``stats.json``) instead of failing; every other :class:`DataError` always fails."""


class ConfigError(ZerosegError, ValueError):
    """Bad configuration: unknown key, unknown class name, inconsistent settings, ..."""


class LeakageError(DataError):
    """The leakage guard: a training target would carry an unseen class (an unseen class id in a
    training label, or a lookup table mapping one to a training id). Names the image or the id."""
