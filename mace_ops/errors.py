"""The one error type users see for bad input or an impossible request."""


class MaceError(ValueError):
    """Bad input or an unsolvable request. The message names the input and the fix."""
