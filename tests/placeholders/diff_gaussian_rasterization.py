"""Import-only placeholder for diff_gaussian_rasterization (the CUDA rasterizer threestudio-3dgs
imports at module level): the names exist so the extension registers its types; building a
rasterizer, or using anything else, raises."""

_MSG = ("diff_gaussian_rasterization.{} is not available: this is the test placeholder "
        "(tests/placeholders); install the CUDA rasterizer to render Gaussians")


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(_MSG.format(type(self).__name__))


class GaussianRasterizationSettings(_Unavailable):
    pass


class GaussianRasterizer(_Unavailable):
    pass


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(_MSG.format(name))
