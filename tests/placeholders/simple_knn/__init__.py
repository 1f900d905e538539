"""Import-only placeholder package for simple_knn (a CUDA extension of threestudio-3dgs)."""
