"""Command line: build, predict, eval, serve, simulate.

    python -m app build --product NAME --images DIR
    python -m app build --product NAME --images NEW_DIR --append [--base-version V]
    python -m app predict --product NAME IMAGE... [--heatmap-dir DIR]
    python -m app eval --data ROOT --category C [--json OUT]
    python -m app serve [--host H] [--port P] [--engine uvicorn|ray]
    python -m app simulate --url URL --product P --images DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from app.service.settings import WEIGHTS_ENV

DEFAULT_MODELS_DIR = "models"


def _models_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("PATCHCORE_MODELS_DIR") or DEFAULT_MODELS_DIR)


def _map_sigma(text: str) -> float:
    from app.core.patchcore import check_map_sigma

    try:
        return check_map_sigma(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:  # uvicorn would bind value mod 65536 and log the number given
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    from app.core.backbones import BACKBONES, DEFAULT_BACKBONE
    from app.core.embedding import AGGREGATIONS, NORMALISATIONS
    from app.core.patchcore import PatchCoreConfig

    defaults = PatchCoreConfig()

    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    parser.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV),
                        help="local weights file for backbones without packaged weights (ResNets)")
    parser.add_argument("--image-size", type=int, default=defaults.embedder.image_size)
    parser.add_argument("--stage-dim", type=int, default=defaults.embedder.stage_dim,
                        help="values kept per backbone stage (0: all; default %(default)s)")
    parser.add_argument("--coreset-ratio", type=float, default=None,
                        help="fraction of all patches kept (default 0.1; with --append: the base bank's)")
    parser.add_argument("--coreset-size", type=int, default=None, help="absolute bank size (overrides ratio)")
    parser.add_argument("--projection-dim", type=int, default=128,
                        help="random projection for coreset selection (0: select in the feature space)")
    parser.add_argument("--reweight", type=int, default=0, metavar="B",
                        help="Eq. 7 reweighting with B >= 2 neighbours (0: off)")
    parser.add_argument("--patch-size", type=int, default=defaults.embedder.patch_size,
                        help="neighbourhood each patch feature aggregates, odd (paper: 3)")
    parser.add_argument("--aggregation", default=defaults.embedder.aggregation, choices=list(AGGREGATIONS),
                        help="3x3 neighbourhood: mean, or flatten (official: C x 3 x 3 pooled to --stage-dim)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help="image score = mean of the top K patch scores (1: the maximum)")
    parser.add_argument("--normalisation", default=defaults.embedder.normalisation, choices=list(NORMALISATIONS),
                        help="pixel normalisation: image (each image brought to one reference exposure "
                             "first) or dataset (the backbone's statistics only); default %(default)s")
    framing = parser.add_mutually_exclusive_group()
    framing.add_argument("--centre-crop", type=float, default=None, metavar="F",
                         help="frame the central fraction F of width and height (0.875 = resize 256, crop 224)")
    framing.add_argument("--roi", default=None, metavar="X0,Y0,X1,Y1",
                         help="frame this box, in original-image pixels (default: the whole frame)")
    parser.add_argument("--aspect", default=defaults.framing.aspect, choices=["keep", "squeeze"],
                        help="network input of each framed box: about S x S pixels with its aspect kept "
                             "(keep), or exactly S x S (squeeze, banks before stop 21); default %(default)s")
    parser.add_argument("--holdout-fraction", type=float, default=defaults.holdout_fraction,
                        help="nominal images kept out of the bank to calibrate the threshold")
    parser.add_argument("--map-sigma", type=_map_sigma, default=defaults.gaussian_sigma, metavar="PX",
                        help="anomaly-map smoothing, Gaussian sigma in network-input pixels (paper: 4; larger "
                             "suits large, low-contrast defects, README)")
    parser.add_argument("--stage-balance", action="store_true",
                        help="scale each backbone stage to an equal measured share of the distance (coarser "
                             "maps, better on textures; README)")
    parser.add_argument("--false-alarm-rate", type=float, default=defaults.false_alarm_rate,
                        help="false-alarm budget on good parts for the nominal-only threshold (0.001 = 1 in 1,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=os.environ.get("PATCHCORE_DEVICE", "auto"),
                        choices=["auto", "cpu", "cuda"])
    _add_runtime_options(parser)


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """How the backbone and the search run; never what they compute (banks do not record these)."""
    parser.add_argument("--backbone-runtime", default=None, choices=["auto", "torch", "openvino"],
                        help="default $PATCHCORE_BACKBONE_RUNTIME or auto (OpenVINO on a CPU when installed)")
    parser.add_argument("--backbone-precision", default=None, choices=["auto", "f32", "bf16"],
                        help="OpenVINO precision; default $PATCHCORE_BACKBONE_PRECISION or auto (bf16 on AMX)")
    parser.add_argument("--search-backend", default="auto", choices=["auto", "faiss", "torch"],
                        help="exact kNN search: auto = $PATCHCORE_SEARCH_BACKEND, else faiss GPU > torch "
                             "on CUDA > faiss on the CPU")
    parser.add_argument("--search-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="torch search products (exact fp32 re-rank either way); auto = "
                             "$PATCHCORE_SEARCH_PRECISION, else bf16 on CUDA")


def _embedder_from(args: argparse.Namespace, config):
    from app.core.embedding import create_embedder

    return create_embedder(config, device=args.device, weights_path=args.weights,
                           runtime=args.backbone_runtime, precision=args.backbone_precision)


def _config_from(args: argparse.Namespace):
    from app.core.embedding import EmbedderConfig
    from app.core.framing import Framing
    from app.core.patchcore import PatchCoreConfig

    embedder = EmbedderConfig(backbone=args.backbone, image_size=args.image_size, stage_dim=args.stage_dim or None,
                              patch_size=args.patch_size, aggregation=args.aggregation,
                              normalisation=args.normalisation)
    embedder.validate()
    ratio = 0.1 if args.coreset_ratio is None else args.coreset_ratio
    return PatchCoreConfig(embedder=embedder, coreset_ratio=ratio, coreset_size=args.coreset_size,
                           projection_dim=args.projection_dim or None, reweight_neighbours=args.reweight,
                           top_k=args.top_k, framing=Framing.parse(args.centre_crop, args.roi, args.aspect),
                           holdout_fraction=args.holdout_fraction, false_alarm_rate=args.false_alarm_rate,
                           gaussian_sigma=args.map_sigma, stage_balance=args.stage_balance, seed=args.seed)


class _Progress:
    """One tqdm bar per phase, on stderr."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.bar: Any = None

    def __call__(self, phase: str, fraction: float) -> None:
        from tqdm import tqdm

        if phase != self.phase or self.bar is None:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=100, desc=phase, unit="%", file=sys.stderr, leave=False)
        self.bar.update(max(0, round(fraction * 100) - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_build(args: argparse.Namespace) -> int:
    from app.core.evaluation import peak_rss_mb
    from app.core.images import list_images
    from app.core.patchcore import build_bank
    from app.storage import LocalBankStore, check_product_name

    check_product_name(args.product)
    if not args.append and (args.base_version or args.until != "size"):
        raise ValueError("--base-version and --until only go with --append")
    if args.append:
        # What the base bank was built and calibrated with: refused by name, never ignored
        # (the admin API answers the same with a 422).
        # Given on the command line, even at its default value: `--aspect keep` on a squeezed
        # base would otherwise be dropped without a word (main() sets given_options).
        kept = [f"--{dest.replace('_', '-')}" for dest in _KEPT_BY_APPEND if dest in args.given_options]
        if kept:
            raise ValueError(f"an append build keeps its base bank's {', '.join(kept)}; leave "
                             f"{'it' if len(kept) == 1 else 'them'} out")
    images = list_images(args.images)
    validation = None
    if args.validation:
        validation = _labelled_folder(Path(args.validation))
    store = LocalBankStore(_models_dir(args.models_dir))
    if args.append:
        return _append(args, store, images, validation)
    config = _config_from(args)
    embedder = _embedder_from(args, config.embedder)
    progress = _Progress()
    start = time.perf_counter()
    bank = build_bank(images, config, embedder, progress=progress, validation=validation)
    progress.close()
    version = store.save(args.product, bank, activate=not args.no_activate)
    print(json.dumps({"product": args.product, "version": version, "bank_size": bank.size,
                      "images": bank.manifest["images"], "threshold": bank.threshold,
                      "build_seconds": round(time.perf_counter() - start, 2),
                      "timings": bank.manifest["timings"], "peak_rss_mb": round(peak_rss_mb(), 1),
                      "path": str(store.root / args.product / version)}, indent=2))
    return 0


# Build options an append cannot change: they decide the base bank's features, scores or threshold.
_KEPT_BY_APPEND = ("backbone", "image_size", "stage_dim", "patch_size", "aggregation", "normalisation",
                   "centre_crop", "roi", "aspect", "holdout_fraction", "map_sigma", "false_alarm_rate", "stage_balance",
                   "top_k", "reweight", "projection_dim")


def _append(args: argparse.Namespace, store, images, validation) -> int:
    """Append build: the base bank's own backbone and feature settings; ratio, size, seed may change."""
    from app.core.embedding import EmbedderConfig
    from app.core.evaluation import peak_rss_mb
    from app.core.patchcore import append_config, append_to_bank

    base_version, base = store.load(args.product, args.base_version)
    overrides: dict = {"seed": args.seed}
    if args.coreset_ratio is not None:
        overrides["coreset_ratio"] = args.coreset_ratio
    if args.coreset_size is not None:
        overrides["coreset_size"] = args.coreset_size
    config = append_config(base, **overrides)
    embedder = _embedder_from(args, EmbedderConfig.from_dict(base.embedder))
    progress = _Progress()
    start = time.perf_counter()
    bank = append_to_bank(base, images, config, embedder, base_version=base_version, until=args.until,
                          progress=progress, validation=validation)
    progress.close()
    version = store.save(args.product, bank, activate=not args.no_activate)
    lineage = bank.manifest["lineage"]
    print(json.dumps({"product": args.product, "version": version, "base_version": base_version,
                      "bank_size": bank.size, "base_bank_size": base.size, "images": bank.manifest["images"],
                      "threshold": bank.threshold, "base_threshold": base.threshold,
                      "lineage": {"images": lineage["images"], "base_versions": lineage["base_versions"],
                                  "stopped_by": lineage["steps"][-1]["stopped_by"]},
                      "build_seconds": round(time.perf_counter() - start, 2),
                      "timings": bank.manifest["timings"], "peak_rss_mb": round(peak_rss_mb(), 1),
                      "path": str(store.root / args.product / version)}, indent=2))
    return 0


def _labelled_folder(folder: Path) -> tuple[list[Path], list[int]]:
    """folder/good/* are nominal (0); every other subfolder holds defective images (1)."""
    from app.core.images import list_images

    images, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in list_images(sub):
            images.append(path)
            labels.append(0 if sub.name == "good" else 1)
    return images, labels


def cmd_predict(args: argparse.Namespace) -> int:
    from app.core.embedding import EmbedderConfig
    from app.core.images import decode_image
    from app.core.patchcore import PatchCoreModel
    from app.service.rendering import overlay_png
    from app.storage import LocalBankStore

    store = LocalBankStore(_models_dir(args.models_dir))
    version, bank = store.load(args.product, args.version)
    embedder = _embedder_from(args, EmbedderConfig.from_dict(bank.embedder))
    model = PatchCoreModel(bank, embedder, args.search_backend, args.search_precision)
    heatmap_dir = Path(args.heatmap_dir) if args.heatmap_dir else None
    if heatmap_dir is not None:
        if heatmap_dir.exists() and not heatmap_dir.is_dir():
            raise ValueError(f"--heatmap-dir {heatmap_dir} exists and is not a folder")
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    # Images of one name from several folders (every MVTec defect folder has a 000.png) would
    # overwrite each other's heatmap: then every file name starts with the image's position.
    stems = [Path(p).stem for p in args.images]
    numbered = len(set(stems)) < len(stems)
    any_anomalous = False
    for index, path in enumerate(args.images):
        image = decode_image(Path(path), max_pixels=None)
        prediction = model.predict([image])[0]
        any_anomalous |= prediction.is_anomalous
        record = {"image": str(path), "raw_score": round(prediction.raw_score, 4),
                  "score": round(prediction.score, 4), "threshold": round(prediction.threshold, 4),
                  "is_anomalous": prediction.is_anomalous, "product": args.product, "version": version}
        if heatmap_dir is not None:
            name = f"{index:04d}_{Path(path).stem}" if numbered else Path(path).stem
            out = heatmap_dir / f"{name}_heatmap.png"
            out.write_bytes(overlay_png(prediction.normalised_map, image))
            record["heatmap"] = str(out)
        print(json.dumps(record))
    return 1 if args.fail_on_anomaly and any_anomalous else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from app.core.evaluation import evaluate_category, read_category

    config = _config_from(args)
    category = read_category(args.data, args.category)
    # magnetic_tile's masks are anti-aliased; its dataset README says defect = value > 127.
    mask_threshold = args.mask_threshold
    if mask_threshold is None:
        mask_threshold = 127 if args.category == "magnetic_tile" else 0
    embedder = _embedder_from(args, config.embedder)
    progress = _Progress()
    result = evaluate_category(category, config, embedder, mask_threshold=mask_threshold, progress=progress,
                               search=(args.search_backend, args.search_precision))
    progress.close()
    result["mask_threshold"] = mask_threshold
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from app.cluster.serve_app import deploy

        deploy(address=args.address, host=args.host, port=args.port, replicas=args.replicas,
               num_cpus=args.num_cpus, num_gpus=args.num_gpus, detach=args.detach)
        return 0
    from app.service.api import serve

    serve(host=args.host, port=args.port)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from app.simulate import run_from_args

    return int(run_from_args(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build a product's bank from a folder of nominal images")
    build.add_argument("--product", required=True)
    build.add_argument("--images", required=True, help="folder of defect-free images")
    build.add_argument("--models-dir", default=None, help="bank store root (default $PATCHCORE_MODELS_DIR or ./models)")
    build.add_argument("--validation", default=None,
                       help="labelled folder (good/ + defect subfolders): use the F1-optimal threshold")
    build.add_argument("--no-activate", action="store_true", help="store the version without making it active")
    build.add_argument("--append", action="store_true",
                       help="add the images to an existing bank instead of building from scratch "
                            "(backbone and feature settings come from that bank)")
    build.add_argument("--base-version", default=None, help="with --append: the bank to extend (default: active)")
    build.add_argument("--until", choices=["size", "radius"], default="size",
                       help="with --append: grow to the coreset ratio of all patches seen (size), or stop "
                            "once the new patches are covered as well as the base's (radius)")
    _add_engine_options(build)
    build.set_defaults(func=cmd_build)

    predict = sub.add_parser("predict", help="score images with a product's active bank")
    predict.add_argument("--product", required=True)
    predict.add_argument("images", nargs="+")
    predict.add_argument("--models-dir", default=None)
    predict.add_argument("--version", default=None, help="bank version (default: the active one)")
    predict.add_argument("--heatmap-dir", default=None, help="write heatmaps overlaid on the photos here")
    predict.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV))
    predict.add_argument("--device", default=os.environ.get("PATCHCORE_DEVICE", "auto"),
                         choices=["auto", "cpu", "cuda"])
    predict.add_argument("--fail-on-anomaly", action="store_true", help="exit 1 when any image is anomalous")
    _add_runtime_options(predict)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("eval", help="accuracy and speed on an MVTec-layout category")
    evaluate.add_argument("--data", required=True, help="MVTec-layout root")
    evaluate.add_argument("--category", required=True)
    evaluate.add_argument("--json", default=None, help="also write the result here")
    evaluate.add_argument("--mask-threshold", type=int, default=None,
                          help="mask value above which a pixel is defective (default 0; 127 for magnetic_tile)")
    _add_engine_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    serve = sub.add_parser("serve", help="run the REST service")
    serve.add_argument("--host", default=os.environ.get("PATCHCORE_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=_port, default=os.environ.get("PATCHCORE_PORT", "8000"),
                       help="0-65535 (default $PATCHCORE_PORT or 8000)")
    serve.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn",
                       help="uvicorn: one process (default); ray: Ray Serve replicas (pip install -e '.[ray]')")
    serve.add_argument("--address", default=None,
                       help="ray: the cluster to join (HOST:PORT or auto); default starts a local one")
    serve.add_argument("--replicas", type=int, default=None, help="ray: fixed replicas (default autoscaling 1-4)")
    serve.add_argument("--num-cpus", type=float, default=1.0, help="ray: CPUs reserved per replica")
    serve.add_argument("--num-gpus", type=_non_negative_float, default=None,
                       help="ray: GPUs per replica, a fraction to share one (0.25: four replicas per GPU, "
                            "each its own process); default 1 when the cluster has a GPU, else 0")
    serve.add_argument("--detach", action="store_true",
                       help="ray: return once deployed; the app stays on the cluster")
    serve.set_defaults(func=cmd_serve)

    from app.simulate import build_parser as build_simulate_parser

    simulate = sub.add_parser("simulate", help="stream a folder of images to the service like camera lines")
    build_simulate_parser(simulate)
    simulate.set_defaults(func=cmd_simulate)
    return parser


def _given_options(argv: list[str] | None) -> set[str]:
    """The build options the command line names (abbreviated or with `=` too): the same
    arguments parsed again with every build default suppressed."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in subcommands.choices["build"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every failed SIMD probe
    argv = list(argv) if argv is not None else None  # parsed twice for an append build
    args = build_parser().parse_args(argv)
    if getattr(args, "append", False):
        args.given_options = _given_options(argv)
    from app.core.errors import PatchCoreError
    from app.storage import InvalidName, ProductNotFound, StoreError

    try:
        return int(args.func(args))
    except (PatchCoreError, InvalidName, ProductNotFound, StoreError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
