"""threestudio's Gaussian-splatting path on gsplat (docs/gaussians.md): the geometry
``rfds-gaussians``, the renderer ``rfds-gsplat-renderer``, the system ``rfds-gaussian-system``
(densification by gsplat's own strategies) and the exporter ``rfds-gaussian-exporter`` (3DGS PLY,
optional mesh)."""
