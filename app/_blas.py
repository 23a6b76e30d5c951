"""Threading settings that must be in place before torch and faiss load.

1. Pick an OpenBLAS kernel for faiss's bundled OpenBLAS on CPUs it does not know.

faiss-cpu wheels bundle OpenBLAS 0.3.15, which predates recent Xeons and falls
back to its slowest generic kernel ("Prescott") there: exact kNN search then
runs about 3.7x slower than with the AVX-512 kernel (measured: 68 ms vs 18 ms
for 784 queries against 16,385 x 152-d on 2 cores). OpenBLAS reads
OPENBLAS_CORETYPE once, when the library loads, so this must run before faiss
is imported. An operator's own OPENBLAS_CORETYPE always wins.

2. GOMP_SPINCOUNT=10000. torch and faiss each bring an OpenMP runtime (libgomp);
by default idle threads spin for about 300,000 iterations after each parallel
region, so faiss's threads burn the cores while torch computes, and vice versa.
Measured on 2 cores (backbone / search ms per 900x900 image, median of 30):
    default           quiet 21 / 19   with a CPU-bound neighbour 76 / 302
    PASSIVE (no spin) quiet 44 / 23   with a CPU-bound neighbour 85 / 71
    GOMP_SPINCOUNT=1e4 quiet 22 / 20   with a CPU-bound neighbour 49 / 84
A short spin keeps torch's many small parallel regions fast and stops the two
runtimes starving each other. Again only when the operator has not set it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def configure_native_threads() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    if "OPENBLAS_CORETYPE" in os.environ or os.environ.get("PATCHCORE_KEEP_OPENBLAS_CORETYPE"):
        return
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"
