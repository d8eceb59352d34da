"""The one exception type for mistakes a user can make (bad path, broken file, bad parameter).

It subclasses ValueError so callers that catch ValueError keep working; the CLI prints its message
as one line instead of a traceback, while internal bugs still show their traceback.
"""


class UserError(ValueError):
    """Something the user supplied is wrong; the message says what and how to fix it."""
