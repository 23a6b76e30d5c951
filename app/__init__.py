"""PatchCore inspection service: anomaly detection for factory visual inspection."""

from app._blas import prefer_fast_openblas_kernels

__version__ = "0.1.0"

# Must run before faiss (and its bundled OpenBLAS) is imported anywhere.
prefer_fast_openblas_kernels()
