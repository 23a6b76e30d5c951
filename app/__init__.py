"""PatchCore inspection service: anomaly detection for factory visual inspection."""

from app._blas import configure_native_threads

__version__ = "0.1.0"

# Must run before torch and faiss (with their OpenMP and OpenBLAS runtimes) load.
configure_native_threads()
