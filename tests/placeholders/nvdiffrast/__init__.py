"""Import-only placeholder package for nvdiffrast (see tests/placeholders/tinycudann.py)."""
