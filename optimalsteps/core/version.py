"""The library's version, here in the core so that files it writes can record it."""

__version__ = "0.1.0"
