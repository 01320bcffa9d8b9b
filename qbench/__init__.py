"""qbench: how much accuracy does a low-bit weight quantizer cost on Whisper and wav2vec 2.0?"""

__version__ = "0.1.0"
