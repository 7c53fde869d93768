"""MMCAF-Net: multimodal (CT + clinical record) lung-cancer classification.

The library is importable with numpy and torch alone; nothing here imports Qt or Slicer, and only
``MMCAFNetLib.scene`` touches MRML (lazily).
"""

__version__ = "0.1.0"
