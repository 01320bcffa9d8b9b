"""The one exception every checkpoint loader raises.

Loaders read files written by other programs (torch, transformers, openai-whisper), so most
failures are the file's fault, not the caller's: a truncated download, a format we do not read,
a key that is missing. One exception type, with a one-line message that names the file at fault,
lets the CLI report it plainly and lets tests assert on it without caring which layer failed.
"""

from __future__ import annotations

from qbench.errors import QBenchError


class CheckpointError(QBenchError):
    """A checkpoint could not be read or mapped; the message names the file and the reason."""
