"""The one exception type the user sees: its message is a single line that says what is wrong,
where, and how to fix it. The CLI prints it and exits with code 2, never with a traceback."""


class TlpipeError(Exception):
    """A problem with the user's input or environment that the user can fix."""
