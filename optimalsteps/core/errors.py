"""The one exception type users see: a bad input, named in one line."""


class OptimalStepsError(ValueError):
    """A problem with what the user asked for; the CLI prints it as one line and exits non-zero."""
