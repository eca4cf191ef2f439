"""vlp: vision-language pre-training (Oscar, UNITER) from a laptop CPU to many GPUs."""

__version__ = "0.4.0"


class VlpError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 1.

    The message should name the file, key or field at fault and what to do about it.
    """

    exit_code = 1
