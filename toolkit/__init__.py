"""lctk: exact long-context inference for Hugging Face causal LMs across many devices."""
from .api import GenerationResult, LongContextModel, parallelize

__version__ = "0.1.0"
__all__ = ["LongContextModel", "GenerationResult", "parallelize", "__version__"]
