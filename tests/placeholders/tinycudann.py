"""Import-only placeholder for tinycudann (CUDA-only) so that ``import threestudio`` works in
the CPU test environment.  Added to sys.path by the threestudio test fixture only.

``free_temporary_memory`` is a no-op (threestudio's ``cleanup()`` calls it after encoding prompts;
with no tiny-cuda-nn module alive there is nothing to free).  Anything else raises."""


def free_temporary_memory() -> None:
    return None


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"tinycudann.{name} is not available: this is the test placeholder (tests/placeholders); "
        "install tiny-cuda-nn on a CUDA machine to use threestudio's hash-grid models"
    )
