"""zeroseg: zero-shot semantic segmentation with CLIP (ZegFormer, ZegCLIP, DeOP, PADing)."""

__version__ = "0.1.0"
