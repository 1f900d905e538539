"""A real full disk for tests: a 64 KiB tmpfs (needs root and ``mount``), and ``fill`` to use it up."""
import errno
import os
import subprocess

import pytest


def mount_tmpfs(d) -> None:
    """Mount a 64 KiB tmpfs on the existing folder ``d``, or skip the test with the reason."""
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-ENOSPC cases cover it")


def umount(d) -> None:
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(d) -> None:
    """Write zeros into ``d/filler`` until the disk is full (ENOSPC)."""
    fd = os.open(os.path.join(str(d), "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
