"""loopgolf: the best language model per stored byte."""

__version__ = "0.1.0"
