"""Errors rfds-bench shows as one line (``rfds-bench: error: …``, exit status 2): each message names the
bad value or file and what to do instead."""


class BenchError(ValueError):
    """Bad input or a results folder rfds-bench cannot use; raised before any run starts."""


class SuiteError(BenchError):
    """A suite file or option that does not follow the schema."""


class ResultsError(BenchError):
    """A results folder whose files cannot be read as rfds-bench wrote them (corrupt, replaced, changed)."""
