"""The one exception type for mistakes a user can make or fix."""


class BKSDMError(Exception):
    """A problem the user can act on: the message says what went wrong and what to do.

    UI, API and CLI show `str(error)` as it is, never a stack trace.
    """
