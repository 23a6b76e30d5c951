"""PNG decodes per second by decode-thread count: every decode in pyspng (before) against
one libspng slot with the rest in Pillow (app.core.images._SPNG_SLOT, now).

    python benchmarks/png_decode_threads.py --image ../shared/data/bottle/test/good/000.png
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app.core.images as images  # noqa: E402


class EveryDecodeInPyspng:
    """The behaviour before the slot: the 'lock' is always free."""

    def acquire(self, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass


def decodes_per_second(data: bytes, threads: int, count: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: images.decode_for_model(data, min_side=224), range(threads)))
        started = time.perf_counter()
        list(pool.map(lambda _: images.decode_for_model(data, min_side=224), range(count)))
        return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, default=Path("../shared/data/bottle/test/good/000.png"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = args.image.read_bytes()
    slot = images._SPNG_SLOT
    for round_number in range(args.rounds):
        for name, lock in (("all-pyspng", EveryDecodeInPyspng()), ("one-slot", slot)):
            images._SPNG_SLOT = lock  # type: ignore[assignment]
            print(round_number, name, " ".join(
                f"t{t}={decodes_per_second(data, t, args.count):.0f}/s" for t in args.threads), flush=True)
    images._SPNG_SLOT = slot


if __name__ == "__main__":
    main()
