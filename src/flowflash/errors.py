"""One exception type for every user-facing error: the CLI prints its message on one line, exit 2."""


class FlowflashError(Exception):
    """A problem with the user's input or files; the message names it."""
