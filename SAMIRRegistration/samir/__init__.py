"""SAMIR: deformable 3D registration driven by frozen Segment-Anything-family image encoders.

The engine (this package) depends on torch, numpy and SimpleITK only; conventions are stated in
:mod:`samir.spatial` (grids and fields) and :mod:`samir.geometry` (voxel/world, LPS/RAS).
"""
__version__ = "0.1.0"

CITATION = ("SAMIR, an efficient registration framework via robust feature learning from SAM. "
            "(Paper describing structure-aware feature embedding and pyramidal deformation field prediction.)")
