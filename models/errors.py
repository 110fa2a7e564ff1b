"""The exception a model raises when the user configured it wrongly.

Models depend on plain Python only: no import from the trainer. `ModelConfigError` is a
`ValueError`, so callers that catch `ValueError` keep working; the trainer treats exactly
this type as user input (one line, exit status 2) and lets every other exception keep its
traceback.
"""

__all__ = ["ModelConfigError"]


class ModelConfigError(ValueError):
    """A model was given an invalid configuration by the user (bad keep rate, layer list, ratio, ...).

    The message is one line naming the problem and the fix.
    """
