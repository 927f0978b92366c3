"""sdxl-bento: a production text-to-image service for Stable Diffusion XL 1.0 on BentoML."""

__version__ = "0.1.0"
