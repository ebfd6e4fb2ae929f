"""The exception types transferkit raises for a user's mistake or bad input; the CLI prints them as one line.

``TransferkitError`` subclasses ``ValueError`` (as scikit-learn's parameter errors do), so code that already
catches ``ValueError`` around a fit or a prediction keeps working.
"""


class TransferkitError(ValueError):
    """A clear, one-line problem a user can act on (a bad file, a missing class, no network for weights)."""


class OptionError(TransferkitError):
    """An impossible option value. The message names the Python option (``batch_size``); ``flag_message`` is the
    same sentence naming the command-line flag (``--batch-size``), for the CLI."""

    def __init__(self, name: str, problem: str, value):
        self.option, self.problem, self.value = name, problem, value
        super().__init__(f"{name} {problem}, got {value!r}")

    @property
    def flag_message(self) -> str:
        return f"--{self.option.replace('_', '-')} {self.problem}, got {self.value!r}"


class NotFittedError(TransferkitError, AttributeError):
    """A classifier used before ``fit`` or ``load`` (an AttributeError too, as scikit-learn's, so ``hasattr``
    and protocol checks answer False instead of raising)."""
