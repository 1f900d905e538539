"""3D Gaussian splats in plain PyTorch: the parameters (gsplat's names and activations), their
initialisation, the camera conversion from threestudio's convention, the standard 3DGS PLY file,
the density field behind mesh export, and one render entry point on ``gsplat.rasterization``.

A splat set is a dict of tensors (gsplat's layout, docs/gaussians.md):

    means [N,3] · scales [N,3] (log σ) · quats [N,4] (w,x,y,z, unnormalised) ·
    opacities [N] (logit) · sh0 [N,1,3] · shN [N,K−1,3]  with K = (degree+1)²

No module here imports threestudio; only ``gsplat`` (for :mod:`.render`) is optional.
"""
