"""Record calls that force a host–device sync (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
``nonzero``, boolean-mask indexing, …) while a block runs, via a ``TorchFunctionMode``: on CPU this shows which calls
*would* stall the host behind the GPU's queue on CUDA."""
import traceback
from typing import List, Tuple

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__,
           torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
           torch.Tensor.nonzero, torch.nonzero}
# x[mask] / x[mask] = v with a boolean tensor: the result's size needs the mask's count (nonzero)
MASK_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
PACKAGE_DIR = "threestudio-rfds"


def _has_bool_tensor(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class SyncRecorder(TorchFunctionMode):
    """``calls``: (function name, "file:line in caller") for each syncing call made from this
    project's package (calls inside torch/diffusers/threestudio are recorded by their nearest
    project frame, so a sync hidden in a library call is still attributed)."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func in MASK_INDEXING and _has_bool_tensor(args[1])):
            frames = [f for f in traceback.extract_stack()[:-1] if PACKAGE_DIR in f.filename]
            if frames:
                f = frames[-1]
                self.calls.append((func.__name__, f"{f.filename.split(PACKAGE_DIR + '/')[-1]}:{f.lineno} in {f.name}"))
        return func(*args, **(kwargs or {}))
