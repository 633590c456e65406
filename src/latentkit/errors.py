"""Errors a user can cause. Each carries one sentence that names the problem and what is valid."""


class LatentkitError(Exception):
    """Base of every error latentkit raises on purpose; the CLI prints it as one line."""


class ConfigError(LatentkitError, ValueError):
    """A configuration key or value that latentkit does not accept."""


class WeightsError(LatentkitError):
    """A weight file or folder that cannot be loaded as asked."""


class OutputExistsError(LatentkitError, FileExistsError):
    """A file or folder that a command would write already exists (see ``latentkit.outputs``)."""
