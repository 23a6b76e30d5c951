"""OpenVINO runtime for the stage extractor on CPU hosts.

The truncated backbone (app.core.backbones: stem + blocks up to the stride-16
stage) is converted from the same torch module, with the same weights, the first
time it is needed, and cached as OpenVINO IR (model.xml + model.bin: a graph and
raw weights, nothing that unpickles) in a cache directory. The cache key holds
the backbone name, the input size, the sha256 of the weights and the OpenVINO
version, so a changed model or runtime never loads a stale graph. Entries are
written to a temporary directory and renamed, and their files' sha256 are checked
on every load; a bad entry is exported again.

Measured on this project's CPU (2 shared cores, AMD EPYC with AVX512-BF16, no
AMX), EfficientNet-Lite0 stages at 224 px, batch 1: torch ~8x slower than
OpenVINO f32; OpenVINO bf16 ~1.5x faster again than f32, with stage maps
within 2-5% (f32: 2e-6). See README for the figures and the AUROC check.
Precision: f32 unless the CPU has AMX (where bf16 runs on the tile units);
PATCHCORE_BACKBONE_PRECISION=bf16 forces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from app._blas import cpu_flags

BackboneRuntime = Literal["auto", "torch", "openvino"]
BackbonePrecision = Literal["auto", "f32", "bf16"]
RUNTIMES: tuple[str, ...] = ("auto", "torch", "openvino")
PRECISIONS: tuple[str, ...] = ("auto", "f32", "bf16")
# Bump when the export itself changes (2: the flatten head can be part of the graph;
# 3: height and width are dynamic in the saved graph).
_FORMAT = 3
logger = logging.getLogger(__name__)


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def default_cache_dir() -> Path:
    """$PATCHCORE_CACHE_DIR, else $XDG_CACHE_HOME/patchcore, else ~/.cache/patchcore."""
    configured = os.environ.get("PATCHCORE_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "patchcore"


def resolve_runtime(runtime: str | None, device: torch.device) -> str:
    """torch or openvino. None reads $PATCHCORE_BACKBONE_RUNTIME (default auto):
    auto = OpenVINO on a CPU device when it is installed, torch otherwise."""
    runtime = runtime or os.environ.get("PATCHCORE_BACKBONE_RUNTIME") or "auto"
    if runtime not in RUNTIMES:
        raise ValueError(f"backbone runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "auto":
        return "openvino" if device.type == "cpu" and openvino_version() is not None else "torch"
    if runtime == "openvino":
        if device.type != "cpu":
            raise ValueError(f"the OpenVINO runtime runs on the CPU only, the device is {device}")
        if openvino_version() is None:
            raise ValueError("backbone runtime openvino asked for, but openvino is not installed")
    return runtime


def resolve_precision(precision: str | None) -> str:
    """f32 or bf16. None reads $PATCHCORE_BACKBONE_PRECISION (default auto): bf16 where
    the CPU has AMX tiles, f32 elsewhere."""
    precision = precision or os.environ.get("PATCHCORE_BACKBONE_PRECISION") or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"backbone precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if "amx_bf16" in cpu_flags() else "f32"
    return precision


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def cache_key(backbone: str, image_size: int, weights_digest: str, version: str) -> str:
    return f"{backbone}-{int(image_size)}px-w{weights_digest[:16]}-ov{version.split('-')[0]}-f{_FORMAT}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_CORE = None
_CORE_LOCK = threading.Lock()


def _core():
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino

            _CORE = openvino.Core()
            # Read the weights into memory instead of mapping model.bin: a cache file
            # truncated or rewritten under a running service would otherwise kill it (SIGBUS).
            _CORE.set_property({"ENABLE_MMAP": False})
        return _CORE


class OpenVINOStages:
    """Drop-in for a StageFeatureExtractor on the CPU: images (B, 3, h, w) float32 ->
    [stride-8 map, stride-16 map] as torch tensors. Any batch size (dynamic batch).

    The graph is saved with a dynamic height and width. It is compiled for S x S at
    start, and once more with the height and width left dynamic on the first input of
    another shape (aspect-kept framing): for magnetic_tile's 25 shapes one static compile
    each held 469 MB, the dynamic one 35 MB, at 1.004x their time (benchmarks/ov_shapes.py)."""

    def __init__(self, module: nn.Module, backbone: str, image_size: int, precision: str = "f32",
                 cache_dir: Path | str | None = None, threads: int | None = None):
        import openvino

        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision must be f32 or bf16, got {precision!r}")
        self.backbone = backbone
        self.image_size = int(image_size)
        self.precision = precision
        self.weights_sha256 = weights_sha256(module)
        self.version = str(openvino.__version__)
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = cache_root / "openvino" / cache_key(backbone, self.image_size, self.weights_sha256,
                                                              self.version)
        self.loaded_from_cache = self._valid(self.cache_path)
        self.cache_error: str | None = None
        if self.loaded_from_cache:
            model = _core().read_model(str(self.cache_path / "model.xml"))
        else:
            model = self._convert(module)
            try:
                self._save(model, self.cache_path)
            except (OSError, RuntimeError) as exc:  # RuntimeError: OpenVINO's own write errors
                # A read-only or full cache directory costs the next start a conversion,
                # never this one its backbone: the converted graph is used from memory.
                self.cache_error = f"{type(exc).__name__}: {exc}"
                logger.warning("OpenVINO cache %s not written (%s); using the conversion in memory",
                               self.cache_path, self.cache_error)
        self.threads = int(threads or torch.get_num_threads())
        self._model = model
        self._lock = threading.Lock()
        compiled = self._compile((self.image_size, self.image_size))
        # (infer request, outputs): S x S, and any other shape (compiled on first use).
        self._square: tuple[Any, list] = (compiled.create_infer_request(), list(compiled.outputs))
        self._any_shape: tuple[Any, list] | None = None
        # What the CPU plugin will really run: a CPU without bf16 kernels (no AVX512-BF16 or
        # AMX) runs a bf16 request in f32, and the embedder must not report bf16 then.
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        effective = "bf16" if hint == openvino.Type.bf16 else "f32"
        if effective != precision:
            logger.warning("OpenVINO runs the backbone in %s: this CPU has no %s kernels", effective, precision)
            self.precision = effective

    def _compile(self, shape: tuple[int, int] | None):
        """Compile the graph for inputs of `shape` (H, W), or None: any height and width.
        Any batch size either way."""
        import openvino

        model = self._model
        if shape is not None:
            model = model.clone()
            model.reshape({0: openvino.PartialShape([-1, 3, shape[0], shape[1]])})
        return _core().compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": self.threads,
        })

    @property
    def compiled_for_any_shape(self) -> bool:
        """Whether an input other than S x S has come (and the dynamic graph is compiled)."""
        return self._any_shape is not None

    def _valid(self, path: Path) -> bool:
        meta_path = path / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            return all(_file_sha256(path / name) == digest for name, digest in meta["files"].items())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _convert(self, module: nn.Module):
        import openvino

        size = self.image_size
        example = torch.zeros(1, 3, size, size)
        # Height and width stay dynamic in the graph (the stages are convolutions and the
        # head resizes to the stride-8 map's own size); `_compile` fixes them to S x S for
        # the square path and leaves them dynamic for every other shape.
        module = module.to("cpu").eval()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # torch.jit.trace (used by the converter) warns that it is deprecated.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return openvino.convert_model(module, example_input=example,
                                          input=[openvino.PartialShape([-1, 3, -1, -1])])

    def _save(self, model, target: Path) -> None:
        import openvino

        size = self.image_size
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            openvino.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            files = {name: _file_sha256(staging / name) for name in ("model.xml", "model.bin")}
            meta = {"backbone": self.backbone, "image_size": size, "weights_sha256": self.weights_sha256,
                    "openvino": self.version, "format": _FORMAT, "files": files}
            (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            if target.exists():  # a bad entry (checked by the caller), or another process won the race
                if self._valid(target):
                    return
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:
                if not self._valid(target):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        square = array.shape[2] == array.shape[3] == self.image_size
        with self._lock:
            if not square and self._any_shape is None:
                compiled = self._compile(None)
                self._any_shape = (compiled.create_infer_request(), list(compiled.outputs))
            request, outputs = self._square if square or self._any_shape is None else self._any_shape
            results = request.infer({0: array})
            # Copies: the request owns its output buffers and reuses them on the next call.
            return [torch.from_numpy(np.array(results[output])) for output in outputs]

    def describe(self) -> dict:
        return {"runtime": "openvino", "precision": self.precision, "openvino": self.version,
                "threads": self.threads, "cache": str(self.cache_path), "cache_error": self.cache_error}
