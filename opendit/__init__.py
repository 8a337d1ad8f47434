"""OpenDiT: train and sample STDiT text-to-video diffusion transformers."""
__version__ = "0.1.0"
