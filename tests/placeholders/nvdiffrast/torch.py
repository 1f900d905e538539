"""Import-only placeholder for nvdiffrast.torch: threestudio names the rasterizer contexts in
annotations at import time; creating one, or using anything else, raises."""

_MSG = ("nvdiffrast.{} is not available: this is the test placeholder (tests/placeholders); "
        "install nvdiffrast on a CUDA machine to rasterize meshes")


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(_MSG.format(type(self).__name__))


class RasterizeGLContext(_Unavailable):
    pass


class RasterizeCudaContext(_Unavailable):
    pass


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(_MSG.format(name))
