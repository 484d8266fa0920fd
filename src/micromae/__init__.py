"""micromae: self-supervised masked autoencoders for microscopy (MAESTER and DAMA)."""

__version__ = "0.1.0"

from micromae.errors import MicromaeInputError

__all__ = ["MicromaeInputError", "__version__"]
