"""SciStream appliance: session-scoped, encrypted data streams between facilities."""

__version__ = "0.1.0"
