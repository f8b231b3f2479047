"""lctk: exact long-context inference for Hugging Face causal LMs across many devices.

The heavy parts (torch, transformers) load on first use, so `lctk plan` and `lctk presets`
start instantly and run where torch is absent.
"""
__version__ = "0.1.0"
__all__ = ["LongContextModel", "GenerationResult", "RunConfig", "make_run_config", "parallelize", "__version__"]


def __getattr__(name):
    if name in ("LongContextModel", "GenerationResult", "parallelize"):
        from . import api

        return getattr(api, name)
    if name in ("RunConfig", "make_run_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
