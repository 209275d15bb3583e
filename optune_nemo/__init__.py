"""optune-nemo: OPTune (efficient online preference tuning) on megatron-core."""

__version__ = "0.1.0"
