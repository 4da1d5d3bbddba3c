"""Error types: bad input raises a subclass of EdgelearnError whose message names the problem."""


class EdgelearnError(Exception):
    """Base class of the errors edgelearn raises on bad input; the message names the problem."""


class BundleError(EdgelearnError, ValueError):
    """A bundle directory, manifest or weight file is missing, corrupt or inconsistent."""


class InputError(EdgelearnError, ValueError):
    """Model inputs or a data file do not match what the bundle declares."""
