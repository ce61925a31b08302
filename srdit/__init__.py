"""srdit: reproduce Speedrunning ImageNet Diffusion (SR-DiT) end to end."""
__version__ = "0.1.0"
