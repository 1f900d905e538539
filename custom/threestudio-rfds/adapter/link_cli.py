"""``rfds-link``: make this package a threestudio extension, or check the environment.

    rfds-link [THREESTUDIO_ROOT] [--force] [--check [--for training]]

The link itself is :mod:`.link`; ``--check`` prints the table of :mod:`.envcheck` (exit status 1
on any problem; ``--for training`` also counts what stops ``launch.py --train``: no GPU, CUDA
extensions, the link).  This module sits on top of both, so neither imports the other's caller.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .envcheck import add_purpose_arg, report
from .link import EXTENSION_NAME, PACKAGE_DIR, LinkError, check_versions, link


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rfds-link", description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", default=os.environ.get("THREESTUDIO_ROOT", "."),
                   help="threestudio checkout (default: $THREESTUDIO_ROOT or the current folder)")
    p.add_argument("--force", action="store_true", help="replace an existing link to another folder")
    p.add_argument("--check", action="store_true",
                   help="change nothing; print the environment table (exit 1 on any problem)")
    add_purpose_arg(p)
    args = p.parse_args(argv)
    if args.purpose != "libraries" and not args.check:
        p.error("--for applies to --check: rfds-link ROOT --check --for training")
    root = os.path.abspath(args.root)
    if args.check:
        return report(root, purpose=args.purpose)
    try:
        for line in check_versions(root):
            print(f"ok: {line}")
        target = link(root, force=args.force)
    except LinkError as e:
        print(f"rfds-link: error: {e}", file=sys.stderr)
        return 1
    print(f"linked {target} -> {PACKAGE_DIR}")
    print(f"run: cd {root} && python launch.py --config custom/{EXTENSION_NAME}/configs/rfds-sd3.yaml --train "
          "--gpu 0 system.prompt_processor.prompt=\"a DSLR photo of a hamburger\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
