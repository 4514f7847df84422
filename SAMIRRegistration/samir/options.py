"""The names a registration option may take: one place, imported by the engine, the command line and
the Slicer module.

Pure Python (no torch, numpy or SimpleITK), so that the Slicer module can build its panel's choices
at application start-up without loading the engine.
"""
MODES = ("zeroshot", "network")
PRESETS = ("fast", "balanced", "accurate")
ENCODERS = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
NORMALIZATIONS = ("auto", "mr", "ct")
ALIGNMENTS = ("affine", "rigid", "none")
SIMILARITIES = ("auto", "ncc", "mind")
DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" picks a GPU
