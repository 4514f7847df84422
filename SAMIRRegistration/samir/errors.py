"""The engine's one error type for bad input (pure Python: the Slicer module and the option schema
use it without loading numpy or torch)."""


class SAMIRInputError(ValueError):
    """An input the engine cannot register, with a message that names the problem."""
