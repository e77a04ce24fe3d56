"""User-facing errors: the entry scripts print ``str(err)`` as one line and exit 2."""


class UserError(Exception):
    """Bad input the user can fix (a path, a flag, a file). The message names the fix."""
