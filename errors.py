"""The two failures a user sees, and the exit codes they map to. Every module raises these; only main() catches."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags, dates, credentials or storage settings: one line and exit 2, before any request."""


class ExportError(Exception):
    """A failure the user can read and act on (Amplitude, the network, the data folder): one line and exit 1."""


MESSAGE_CHARS = 200  # an error's text in a message: its first line, cut to this


def first_text_line(exc: BaseException) -> str:
    """The first line of an exception's text, for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0][:MESSAGE_CHARS] if text else type(exc).__name__
