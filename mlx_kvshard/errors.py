"""User-facing errors: one line naming what is wrong and what to do."""


class UserError(Exception):
    """A mistake in the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = 2
