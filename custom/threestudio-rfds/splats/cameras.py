"""threestudio cameras → gsplat's (docs/gaussians.md §2).

threestudio's ``c2w`` is camera-to-world with OpenGL axes (x right, y up, looking down −z) and a
vertical field of view ``fovy``; its rays pass through pixel centres (i + ½, j + ½).  gsplat takes
world-to-camera ``viewmats`` with OpenCV axes (x right, y down, looking down +z) and pinhole
intrinsics K, with the same pixel-centre convention."""
from __future__ import annotations

import torch
from torch import Tensor

_GL_TO_CV = (1.0, -1.0, -1.0, 1.0)  # flip y and z


def viewmats_from_c2w(c2w: Tensor) -> Tensor:
    """world→camera (OpenCV) = (c2w · diag(1, −1, −1, 1))⁻¹ for c2w [B,4,4] (or [B,3,4])."""
    if c2w.ndim != 3 or c2w.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"c2w must have shape [B, 4, 4] or [B, 3, 4], got {tuple(c2w.shape)}")
    if c2w.shape[-2] == 3:
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=c2w.dtype, device=c2w.device).expand(c2w.shape[0], 1, 4)
        c2w = torch.cat([c2w, bottom], dim=1)
    flip = torch.tensor(_GL_TO_CV, dtype=c2w.dtype, device=c2w.device)
    return torch.linalg.inv(c2w * flip)  # scaling the columns = right-multiplying by diag(flip)


def intrinsics_from_fovy(fovy: Tensor, width: int, height: int) -> Tensor:
    """K [B,3,3] with f = ½·height / tan(½·fovy) (fovy in radians, as threestudio's batch holds it)
    on both axes and the principal point at the image centre (W/2, H/2)."""
    fovy = torch.as_tensor(fovy).reshape(-1)
    focal = 0.5 * height / torch.tan(0.5 * fovy)
    K = torch.zeros(fovy.shape[0], 3, 3, dtype=fovy.dtype, device=fovy.device)
    K[:, 0, 0] = K[:, 1, 1] = focal
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2, height / 2, 1.0
    return K
