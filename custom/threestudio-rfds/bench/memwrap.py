"""Run threestudio's ``launch.py`` in this process and record its peak GPU memory at exit.

Usage: ``python memwrap.py STATS.json path/to/launch.py [launch args...]``.

This file is standalone (standard library only, torch imported only if launch imported it) so it
runs under the threestudio environment's Python without threestudio_rfds installed.  At exit it
writes ``{"exit_code", "cuda_max_memory_allocated", "cuda_max_memory_reserved", "device_name",
"max_rss_bytes"}``: the PyTorch caching allocator's peaks (bytes) over the whole process — the
memory threestudio actually held, not what nvidia-smi shows (CUDA context and other processes
excluded).  threestudio runs single-GPU training in-process, so these cover training and test.
"""
import json
import os
import resource
import runpy
import sys


def _stats(exit_code):
    out = {"exit_code": exit_code, "cuda_max_memory_allocated": None, "cuda_max_memory_reserved": None,
           "device_name": None}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
            out["cuda_max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
            out["device_name"] = torch.cuda.get_device_name()
    except Exception as e:  # never hide the launch's own exit status
        out["cuda_error"] = repr(e)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out["max_rss_bytes"] = int(kib) * 1024
    return out


def main():
    if len(sys.argv) < 3:
        sys.stderr.write(__doc__)
        sys.exit(2)
    stats_path, launch = sys.argv[1], os.path.abspath(sys.argv[2])
    sys.argv = [launch] + sys.argv[3:]
    sys.path.insert(0, os.path.dirname(launch))  # launch.py imports threestudio from its folder
    code = 0
    try:
        runpy.run_path(launch, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except BaseException:
        code = 1
        raise
    finally:
        try:
            tmp = stats_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(_stats(code), f)
            os.replace(tmp, stats_path)
        except OSError as e:  # never turn the launch's result into a failure
            sys.stderr.write(f"memwrap: could not write {stats_path}: {e}\n")


if __name__ == "__main__":
    main()
