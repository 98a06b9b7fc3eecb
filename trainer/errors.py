"""Errors that end a trainer command with one line for the user (no torch needed to import)."""


class DataError(ValueError):
    """A data set that cannot be trained or evaluated on."""


class ExportError(RuntimeError):
    """A bundle export that was refused."""


class TrainExtraMissing(RuntimeError):
    """The workstation's packages (the `train` extra) are not installed."""
