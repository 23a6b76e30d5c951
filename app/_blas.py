"""Threading settings that must be in place before torch and faiss load.

1. Pick an OpenBLAS kernel for faiss's bundled OpenBLAS on CPUs it does not know.

faiss-cpu wheels bundle OpenBLAS 0.3.15, which predates recent Xeons and falls
back to its slowest generic kernel ("Prescott") there: exact kNN search then
runs about 3.7x slower than with the AVX-512 kernel (measured: 68 ms vs 18 ms
for 784 queries against 16,385 x 152-d on 2 cores). OpenBLAS reads
OPENBLAS_CORETYPE once, when the library loads, so this must run before faiss
is imported. An operator's own OPENBLAS_CORETYPE always wins.

2. OMP_WAIT_POLICY=PASSIVE. torch and faiss each bring an OpenMP runtime; with
the default policy the idle threads of one spin while the other computes, and
on a small CPU shared with decode threads that multiplied backbone and search
times (measured: search 394-484 ms spinning vs 74-154 ms passive on a loaded
2-core machine, backbone 137-241 ms vs 70-91 ms). Again only when unset.
"""

from __future__ import annotations

import os
from pathlib import Path


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def configure_native_threads() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OPENBLAS_CORETYPE" in os.environ or os.environ.get("PATCHCORE_KEEP_OPENBLAS_CORETYPE"):
        return
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"
