"""Triton kernels and their launchers, one file per op family. Importable without triton installed
(AVAILABLE is then False and the ops layer registers no triton backend)."""
try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:
    AVAILABLE = False
