"""Tierline: the command line, the model-building pipeline and (soon) the client SDK."""

__version__ = "0.1.0"
