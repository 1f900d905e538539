"""Command-line tools built on the core: the 2D playground (``rfds-2d``) and iRFDS
inversion/editing (``rfds-edit``).  Image I/O lives in :mod:`.images`."""
