"""The one exception type for bad user input."""


class UserError(ValueError):
    """Bad input from the user: the message is one line naming the problem and the fix.

    `main.py` and `benchmark.py` catch it, log the message and exit with status 2.
    """
