"""Import-only placeholder for simple_knn._C: ``distCUDA2`` raises when called."""


def distCUDA2(*args, **kwargs):
    raise RuntimeError("simple_knn._C.distCUDA2 is not available: this is the test placeholder "
                       "(tests/placeholders); install simple-knn on a CUDA machine")
