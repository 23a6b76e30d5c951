#!/usr/bin/env python3
"""Generate the demo product's images: a turned steel washer seen from above.

The service builds an embedded demo product from these images at first start,
so they must be ours to redistribute: they are drawn here from a fixed seed
with numpy and PIL only, no photograph or dataset goes in. Run it again after a
change and commit the result:

    python scripts/make_demo_images.py            # writes app/demo/images/
    python scripts/make_demo_images.py --check    # exits 1 if the files differ

What it draws, 256x256 8-bit grayscale (industrial cameras are mostly mono):
- a steel washer with concentric turning marks, an anisotropic "bow-tie"
  highlight from the ring light, lit chamfers on the bore and the rim and a
  keyed notch in the bore, on a dark, mottled fixture (the same one in every
  image) with a soft shadow;
- nominal variation: the part shifts by up to 4 px, turns by up to 10 degrees,
  its radii vary by about 1 %, the light's angle, gain and gradient change,
  the turning marks differ from part to part, the camera shakes by up to
  3 px against the fixture, and there is sensor noise;
- 24 nominal parts for the bank (good/) and 4 held out to try (good_test/);
- defects, each with a 0/255 pixel mask: scratches, a dent, a pit, an oil
  stain, a crack from the bore, a chipped rim and a fibre lying on the part.

Pixel values are quantised to 8 bits with sensor noise of about 1.5 grey
levels, which keeps every PNG near 25 kB.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256
SEED = 20240604
N_GOOD = 24
N_GOOD_TEST = 4
FIXTURE_JITTER = 3
OUT_DIR = Path(__file__).resolve().parent.parent / "app" / "demo" / "images"

Rng = np.random.Generator


@dataclass(frozen=True)
class Pose:
    """Where the washer lies in one image and how it is lit."""

    cx: float
    cy: float
    angle: float  # rotation of the part (radians); moves the notch
    r_out: float
    r_in: float
    light: float  # direction of the ring light's brightest side (radians)
    gain: float
    gradient: tuple[float, float]


def _smooth_field(rng: Rng, cells: int, size: int = SIZE) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a random grid, bicubic-upsampled."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))
    return field / max(float(np.abs(field).max()), 1e-6)


@lru_cache(maxsize=1)
def _fixture() -> np.ndarray:
    """The fixture's dark, mottled surface: one texture for all images, with room to jitter."""
    rng = np.random.default_rng(SEED + 1)
    size = SIZE + 2 * FIXTURE_JITTER
    texture = 38 + 7 * _smooth_field(rng, 11, size) + 3 * _smooth_field(rng, 44, size)
    texture.setflags(write=False)
    return texture


def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return xx + 0.5, yy + 0.5


def _segment_distance(xx: np.ndarray, yy: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (H, W) from every pixel to a polyline given as points (N, 2) of (x, y)."""
    best = np.full(xx.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        dx, dy = x1 - x0, y1 - y0
        length2 = max(dx * dx + dy * dy, 1e-6)
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0.0, 1.0)
        d = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
        np.minimum(best, d, out=best)
    return best


def random_pose(rng: Rng) -> Pose:
    return Pose(
        cx=SIZE / 2 + rng.uniform(-4, 4),
        cy=SIZE / 2 + rng.uniform(-4, 4),
        angle=np.deg2rad(rng.uniform(-10, 10)),
        r_out=100 + rng.uniform(-1.2, 1.2),
        r_in=40 + rng.uniform(-0.6, 0.6),
        light=np.deg2rad(35 + rng.uniform(-12, 12)),
        gain=rng.uniform(0.9, 1.08),
        gradient=(rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08)),
    )


class Washer:
    """One rendered part: the clean image (float, 0..255) plus what defects need."""

    def __init__(self, pose: Pose, rng: Rng) -> None:
        self.pose = pose
        self.rng = rng
        xx, yy = _grid()
        self.xx, self.yy = xx, yy
        dx, dy = xx - pose.cx, yy - pose.cy
        self.rho = np.hypot(dx, dy)
        self.phi = np.arctan2(dy, dx)
        self.height = np.zeros((SIZE, SIZE), np.float32)  # surface relief for shading
        self.coverage = self._coverage()
        self.metal = self._metal()
        self.background = self._background()

    def _coverage(self) -> np.ndarray:
        """Anti-aliased part mask in [0, 1], with the keyed notch cut out of the bore."""
        p = self.pose
        ring = np.clip(p.r_out - self.rho + 0.5, 0, 1) * np.clip(self.rho - p.r_in + 0.5, 0, 1)
        # Key notch: 10 px wide, 6 px deep, on the bore at the part's angle.
        ux, uy = np.cos(p.angle), np.sin(p.angle)
        along = (self.xx - p.cx) * ux + (self.yy - p.cy) * uy
        across = -(self.xx - p.cx) * uy + (self.yy - p.cy) * ux
        notch = np.clip(5.0 - np.abs(across) + 0.5, 0, 1) * np.clip(p.r_in + 6.0 - along + 0.5, 0, 1) * (along > 0)
        return (ring * (1 - notch)).astype(np.float32)

    def _metal(self) -> np.ndarray:
        p, rng = self.pose, self.rng
        rho, phi = self.rho, self.phi
        # Turning marks: a fine groove period plus a tool-chatter profile in rho
        # that differs from part to part.
        profile = np.cumsum(rng.standard_normal(160)) * 0.6
        profile -= profile.mean()
        chatter = np.interp(rho, np.arange(160, dtype=np.float32), profile).astype(np.float32)
        grooves = 3.5 * np.sin(2 * np.pi * rho / 2.6 + rng.uniform(0, 2 * np.pi)) + chatter
        # Circular grooves under a ring light reflect in two opposite lobes.
        lobes = (0.5 + 0.5 * np.cos(2 * (phi - p.light))) ** 3
        face = 128 + 55 * lobes + grooves * (0.6 + 0.8 * lobes)
        face += 10 * _smooth_field(rng, 6)  # slight unevenness of the finish
        # Chamfers (3 px) face outwards/inwards: lit on the side towards the light.
        towards = np.cos(phi - p.light)
        rim = np.clip((rho - (p.r_out - 3.5)) / 3.0, 0, 1)
        bore = np.clip(((p.r_in + 3.0) - rho) / 3.0, 0, 1)
        face = face * (1 - rim) + (120 + 90 * towards) * rim
        face = face * (1 - bore) + (120 - 80 * towards) * bore
        return face.astype(np.float32)

    def _background(self) -> np.ndarray:
        p, rng = self.pose, self.rng
        # The same fixture under every part; the camera mount vibrates by a few px.
        jx, jy = rng.integers(0, 2 * FIXTURE_JITTER + 1, size=2)
        bg = _fixture()[jy : jy + SIZE, jx : jx + SIZE]
        # Soft shadow cast away from the light.
        sx, sy = -4 * np.cos(p.light), -4 * np.sin(p.light)
        srho = np.hypot(self.xx - p.cx - sx, self.yy - p.cy - sy)
        shadow = np.clip((p.r_out + 6 - srho) / 8, 0, 1) * np.clip((srho - p.r_in + 4) / 8, 0, 1)
        return (bg * (1 - 0.45 * shadow)).astype(np.float32)

    def render(self, extra: np.ndarray | None = None) -> np.ndarray:
        """Compose to uint8 (H, W): part over fixture, relief shading, light, noise."""
        p = self.pose
        metal = self.metal.copy()
        if extra is not None:
            metal = metal + extra
        # Shade the relief (dents, scratches) with the light direction.
        gy, gx = np.gradient(self.height)
        metal += 60 * (gx * np.cos(p.light) + gy * np.sin(p.light))
        image = self.background * (1 - self.coverage) + metal * self.coverage
        ramp = 1 + p.gradient[0] * (self.xx / SIZE - 0.5) + p.gradient[1] * (self.yy / SIZE - 0.5)
        image = image * p.gain * ramp + self.rng.normal(0, 1.5, image.shape)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def on_face(self, margin: float) -> tuple[float, float, float]:
        """A random point (x, y, phi) on the flat face, margin px away from both edges."""
        p = self.pose
        r = self.rng.uniform(p.r_in + margin, p.r_out - margin)
        a = self.rng.uniform(-np.pi, np.pi)
        return p.cx + r * np.cos(a), p.cy + r * np.sin(a), a


# --- defects: each draws onto a washer and returns its boolean mask (H, W) -----------


def scratch(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """A thin, slightly curved tool scratch across the face: bright core, dark lip."""
    rng = w.rng
    x, y, _ = w.on_face(22)
    direction = rng.uniform(0, np.pi)
    length = rng.uniform(45, 65)
    bend = rng.uniform(-6, 6)
    t = np.linspace(-0.5, 0.5, 16)
    ux, uy = np.cos(direction), np.sin(direction)
    px = x + t * length * ux - bend * (1 - 4 * t**2) * uy
    py = y + t * length * uy + bend * (1 - 4 * t**2) * ux
    d = _segment_distance(w.xx, w.yy, np.stack([px, py], axis=1))
    extra = 70 * np.exp(-((d / 0.9) ** 2)) - 25 * np.exp(-(((d - 1.8) / 0.8) ** 2))
    w.height -= 0.6 * np.exp(-((d / 1.0) ** 2))
    mask = (d < 2.5) & (w.coverage > 0.5)
    return w.render(extra.astype(np.float32)), mask


def dent(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """A round impact dent: shaded depression, lit on one side, dark on the other."""
    x, y, _ = w.on_face(20)
    sigma = w.rng.uniform(5.0, 6.5)
    r2 = (w.xx - x) ** 2 + (w.yy - y) ** 2
    w.height -= 9.0 * np.exp(-r2 / (2 * sigma**2))
    extra = -18 * np.exp(-r2 / (2 * sigma**2))
    mask = (r2 < (2.0 * sigma) ** 2) & (w.coverage > 0.5)
    return w.render(extra.astype(np.float32)), mask


def pit(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """A casting pore / small hole: dark core with a bright rim towards the light."""
    x, y, _ = w.on_face(16)
    radius = w.rng.uniform(4.0, 5.5)
    d = np.hypot(w.xx - x, w.yy - y)
    core = np.clip(radius - d + 0.5, 0, 1)
    angle = np.arctan2(w.yy - y, w.xx - x)
    rim = np.exp(-(((d - radius - 1.0) / 1.0) ** 2)) * (0.5 + 0.5 * np.cos(angle - w.pose.light))
    extra = core * (25 - w.metal) + 60 * rim
    mask = (d < radius + 2.0) & (w.coverage > 0.5)
    return w.render(extra.astype(np.float32)), mask


def stain(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """A dried oil / coolant stain: an irregular dark film with a darker drying ring."""
    rng = w.rng
    x, y, _ = w.on_face(24)
    # A few overlapping drops with a wobbly outline.
    blob = np.full(w.xx.shape, -1.0, dtype=np.float32)
    for _ in range(4):
        bx, by = x + rng.normal(0, 5), y + rng.normal(0, 5)
        size = rng.uniform(7, 11)
        np.maximum(blob, 1.0 - np.hypot(w.xx - bx, w.yy - by) / size, out=blob)
    blob += 0.3 * _smooth_field(rng, 28)
    film = np.clip(blob * 3, 0, 1)  # soft edge
    edge = np.exp(-((blob / 0.1) ** 2)) * (blob > -0.25)
    near = np.hypot(w.xx - x, w.yy - y) < 30
    extra = -film * 0.33 * w.metal - 22 * edge * near
    mask = (blob > 0) & (w.coverage > 0.5)
    return w.render(extra.astype(np.float32)), mask


def crack(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """A fatigue crack running out from the bore: a jagged dark line, thinning out."""
    rng, p = w.rng, w.pose
    start = rng.uniform(-np.pi, np.pi)
    if abs(np.angle(np.exp(1j * (start - p.angle)))) < 0.4:
        start += np.pi / 2  # not through the key notch
    x, y = p.cx + (p.r_in - 1) * np.cos(start), p.cy + (p.r_in - 1) * np.sin(start)
    heading = start
    points = [(x, y)]
    for _ in range(int(rng.uniform(14, 18))):
        heading = 0.6 * heading + 0.4 * start + rng.normal(0, 0.45)
        step = rng.uniform(2.0, 3.0)
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    pts = np.asarray(points, dtype=np.float32)
    d = _segment_distance(w.xx, w.yy, pts)
    along = np.hypot(w.xx - pts[0, 0], w.yy - pts[0, 1])
    width = np.clip(1.4 - along / 60, 0.5, 1.4)
    extra = -95 * np.exp(-((d / width) ** 2))
    mask = (d < 2.5) & (w.coverage > 0.5)
    return w.render(extra.astype(np.float32)), mask


def chip(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """A chip broken out of the rim: the fixture shows through a ragged bite."""
    rng, p = w.rng, w.pose
    a = rng.uniform(-np.pi, np.pi)
    cx, cy = p.cx + (p.r_out + 3) * np.cos(a), p.cy + (p.r_out + 3) * np.sin(a)
    d = np.hypot(w.xx - cx, w.yy - cy)
    radius = rng.uniform(10, 13) + 2.0 * _smooth_field(rng, 30)
    bite = np.clip(radius - d + 0.5, 0, 1)
    before = w.coverage.copy()
    w.coverage = before * (1 - bite)
    # Freshly broken steel is rough and bright along the fracture.
    fracture = np.exp(-(((d - radius) / 1.2) ** 2))
    extra = 45 * fracture * (0.5 + 0.5 * _smooth_field(rng, 60))
    mask = ((before - w.coverage) > 0.3) | ((fracture > 0.4) & (before > 0.5))
    mask &= before > 0.3
    return w.render(extra.astype(np.float32)), mask


def fibre(w: Washer) -> tuple[np.ndarray, np.ndarray]:
    """Contamination: a dark textile fibre lying on the part, with a faint shadow."""
    rng = w.rng
    x, y, heading = w.on_face(28)
    heading += np.pi / 2
    points = [(x, y)]
    for _ in range(22):
        heading += rng.normal(0, 0.18)
        x, y = x + 2.2 * np.cos(heading), y + 2.2 * np.sin(heading)
        points.append((x, y))
    pts = np.asarray(points, dtype=np.float32)
    d = _segment_distance(w.xx, w.yy, pts)
    shift = (2.0 * np.cos(w.pose.light + np.pi), 2.0 * np.sin(w.pose.light + np.pi))
    ds = _segment_distance(w.xx, w.yy, pts + np.asarray(shift, dtype=np.float32))
    body = np.exp(-((d / 1.1) ** 2))
    shadow = 0.35 * np.exp(-((ds / 2.0) ** 2))
    extra = body * (30 - w.metal) - shadow * w.metal * (1 - body)
    w.coverage = np.maximum(w.coverage, body * (w.coverage > 0))
    mask = (d < 2.5) & (w.coverage > 0.5)
    return w.render(extra.astype(np.float32)), mask


DEFECTS: list[tuple[str, Callable[[Washer], tuple[np.ndarray, np.ndarray]]]] = [
    ("scratch", scratch),
    ("scratch", scratch),
    ("dent", dent),
    ("pit", pit),
    ("stain", stain),
    ("crack", crack),
    ("chip", chip),
    ("fibre", fibre),
]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def generate(seed: int = SEED, n_good: int = N_GOOD) -> dict[str, bytes]:
    """All demo files as {relative path: PNG bytes}; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    for i in range(n_good):
        part = Washer(random_pose(rng), rng)
        files[f"good/{i:03d}.png"] = _png(part.render())
    counts: dict[str, int] = {}
    for name, draw in DEFECTS:
        index = counts.get(name, 0)
        counts[name] = index + 1
        image, mask = draw(Washer(random_pose(rng), rng))
        if not mask.any():
            raise RuntimeError(f"defect {name} drew an empty mask")
        stem = f"{name}_{index:03d}"
        files[f"defect/{stem}.png"] = _png(image)
        files[f"mask/{stem}_mask.png"] = _png((mask * 255).astype(np.uint8))
    # Drawn last so that adding them left the images above unchanged.
    for i in range(N_GOOD_TEST):
        part = Washer(random_pose(rng), rng)
        files[f"good_test/{i:03d}.png"] = _png(part.render())
    return files


def stale_files(files: dict[str, bytes], out: Path, tolerance: int = 1) -> list[str]:
    """Files under out that are missing or whose pixels differ by more than tolerance.

    Pixels, not bytes: zlib builds may encode the same image differently, and
    float rounding may move a value by one grey level across CPUs.
    """
    stale = []
    for rel, data in files.items():
        path = out / rel
        if not path.is_file():
            stale.append(rel)
            continue
        with Image.open(io.BytesIO(data)) as new, Image.open(path) as old:
            a = np.asarray(new, dtype=np.int16)
            b = np.asarray(old, dtype=np.int16)
        if a.shape != b.shape or int(np.abs(a - b).max()) > tolerance:
            stale.append(rel)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="only compare with --out")
    args = parser.parse_args(argv)
    files = generate(args.seed)
    if args.check:
        stale = stale_files(files, args.out)
        for rel in stale:
            print(f"differs: {rel}", file=sys.stderr)
        return 1 if stale else 0
    for sub in ("good", "good_test", "defect", "mask"):
        folder = args.out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            if f"{sub}/{old.name}" not in files:
                old.unlink()
    for rel, data in files.items():
        (args.out / rel).write_bytes(data)
    total = sum(len(data) for data in files.values())
    digest = hashlib.sha256(b"".join(files[k] for k in sorted(files))).hexdigest()[:12]
    print(f"wrote {len(files)} files, {total / 1024:.0f} KiB, to {args.out} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
