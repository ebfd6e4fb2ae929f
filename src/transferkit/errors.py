"""The one exception type transferkit raises for a user's mistake or bad input; the CLI prints it as one line."""


class TransferkitError(Exception):
    """A clear, one-line problem a user can act on (a bad file, a missing class, no network for weights)."""
