"""How a synthetic EM volume is drawn: cell layout, organelle placement and texture, image formation.

The steps of :func:`micromae.data.synthetic_em.make_em_volume` (see that module's docstring for what the
volume contains and why). Every function takes the generator ``rng`` and draws from it in a fixed order, so
a seed gives the same volume bit for bit. Arrays are (Z, Y, X); ``labels`` holds the class values below,
which index ``synthetic_em.CLASS_NAMES``; ``ideal`` is the noise-free float32 image in [0, 1].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as label_regions
from skimage.segmentation import find_boundaries

if TYPE_CHECKING:
    from micromae.data.synthetic_em import EMOptions

# Label values, in the order of synthetic_em.CLASS_NAMES.
OUTSIDE, CYTOPLASM, MEMBRANE, NUCLEUS, MITOCHONDRIA, GRANULES = range(6)

# Noise-free grey values in [0, 1] of each texture element. Mitochondria (rim, cristae, matrix) and granules
# (dark core, pale halo) reuse the grey values of other classes on purpose: see the synthetic_em docstring.
GREY = {
    "outside": 0.80, "cytoplasm": 0.60, "ribosome": 0.45, "membrane": 0.28,
    "nucleoplasm": 0.62, "chromatin": 0.38, "envelope": 0.30,
    "matrix": 0.62, "cristae": 0.36, "mito_rim": 0.32, "granule_core": 0.28, "granule_halo": 0.82,
}


def _upsample_linear(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear interpolation of a small (z, y, x) array up to ``shape`` (end points aligned)."""
    out = coarse
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0.0, m - 1.0, n, dtype=np.float32)
        lo = np.minimum(pos.astype(int), m - 2)
        frac = (pos - lo.astype(np.float32)).reshape([-1 if i == axis else 1 for i in range(3)])
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, lo + 1, axis=axis) * frac
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """(Z, Y, X) float32 noise with zero mean, unit std and correlation length ~``scale`` voxels."""
    if scale <= 3:
        field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), scale)
    else:  # coarse noise, smoothed, then linearly upsampled: cheap for long correlation lengths
        coarse_shape = tuple(max(3, int(np.ceil(2 * s / scale)) + 2) for s in shape)
        coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), 1.0)
        field = _upsample_linear(coarse, shape)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field


def _box_grid(box: tuple[slice, ...]) -> list[np.ndarray]:
    """Broadcastable float32 voxel coordinates of a box: [(z, 1, 1), (1, y, 1), (1, 1, x)]."""
    return [np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if i == j else 1 for j in range(3)])
            for i, s in enumerate(box)]


def _n_cells(shape: tuple[int, int, int], opts: EMOptions) -> int:
    if opts.n_cells is not None:
        return int(opts.n_cells)
    z, y, x = shape
    d = opts.cell_diameter
    cell_volume = np.pi / 6 * d**3 if z >= d else np.pi / 4 * d * d * z  # sphere, or a column through Z
    return max(2, int(round(z * y * x * (1 - opts.outside_fraction) / cell_volume)))


def _seed_points(rng: np.random.Generator, shape: tuple[int, int, int], n: int, min_dist: float) -> np.ndarray:
    """(n, 3) Voronoi seeds, kept ``min_dist`` apart by dart throwing (relaxed if the volume is crowded)."""
    points: list[np.ndarray] = []
    for attempt in range(1, 400 * n + 1):
        p = rng.random(3) * np.array(shape)
        if all(np.linalg.norm(p - q) >= min_dist for q in points):
            points.append(p)
            if len(points) == n:
                break
        if attempt % (20 * n) == 0:
            min_dist *= 0.8
    return np.array(points)


def warped_voronoi(rng: np.random.Generator, shape: tuple[int, int, int], opts: EMOptions) -> np.ndarray:
    """(Z, Y, X) int32 region ids 1..n of a Voronoi partition in noise-warped coordinates."""
    n = _n_cells(shape, opts)
    seeds = _seed_points(rng, shape, n, 0.7 * opts.cell_diameter)
    amp, scale = opts.warp * opts.cell_diameter, opts.cell_diameter / 3
    grid = _box_grid(tuple(slice(0, s) for s in shape))
    warped = [g + amp * _smooth_noise(rng, shape, scale) for g in grid]
    best = np.full(shape, np.inf, dtype=np.float32)
    region = np.zeros(shape, dtype=np.int32)
    for i, seed in enumerate(seeds, start=1):
        dist = (warped[0] - seed[0]) ** 2
        dist += (warped[1] - seed[1]) ** 2
        dist += (warped[2] - seed[2]) ** 2
        closer = dist < best
        best[closer] = dist[closer]
        region[closer] = i
    return region


def carve_outside(rng: np.random.Generator, regions: np.ndarray, opts: EMOptions) -> np.ndarray:
    """Carve smooth outside blobs; keep each cell's largest piece if big enough. (Z, Y, X) uint32 ids."""
    field = _smooth_noise(rng, regions.shape, opts.cell_diameter / 2)
    outside = field < np.quantile(field[::2, ::2, ::2], opts.outside_fraction)
    cells = np.where(outside, 0, regions)
    pieces = label_regions(cells, background=0, connectivity=1)  # connected pieces of each cell
    sizes = np.bincount(pieces.ravel())
    cell_of = np.zeros(len(sizes), dtype=np.int64)
    cell_of[pieces.ravel()] = cells.ravel()
    keep = np.zeros(len(sizes), dtype=bool)
    for c in np.unique(cell_of[1:]):
        candidates = np.flatnonzero(cell_of == c)
        keep[candidates[np.argmax(sizes[candidates])]] = True
    keep[0] = False
    min_size = 0.2 * np.count_nonzero(cells) / max(1, np.count_nonzero(keep))
    keep &= sizes >= min(min_size, sizes[keep].max())
    lut = np.zeros(len(sizes), dtype=np.uint32)
    lut[keep] = np.arange(1, np.count_nonzero(keep) + 1, dtype=np.uint32)
    return lut[pieces]



def line_membranes(instances: np.ndarray, opts: EMOptions) -> np.ndarray:
    """(Z, Y, X) uint8 labels from cell ids: OUTSIDE where ``instances == 0``, else CYTOPLASM, with
    MEMBRANE on the ``membrane_thickness`` voxels inside every cell border."""
    labels = np.where(instances > 0, CYTOPLASM, OUTSIDE).astype(np.uint8)
    border = find_boundaries(instances, connectivity=1, mode="inner") & (instances > 0)
    if opts.membrane_thickness > 1:
        border = ndi.binary_dilation(border, iterations=opts.membrane_thickness - 1) & (instances > 0)
    labels[border] = MEMBRANE
    return labels

def _largest_component(mask: np.ndarray) -> np.ndarray:
    comps, n = ndi.label(mask)
    if n <= 1:
        return mask
    return comps == (np.argmax(np.bincount(comps.ravel())[1:]) + 1)


def _nucleus_centre(rng: np.random.Generator, half: np.ndarray, depth: np.ndarray, cell: int,
                    box: tuple[slice, ...]) -> np.ndarray:
    """An off-centre point of ``cell``: its depth (distance to the border) is 50–85 % of the cell's maximum."""
    idx = np.flatnonzero(half == cell)
    if idx.size == 0:  # a cell thinner than the half-resolution grid: its bounding-box centre
        return np.array([(s.start + s.stop) / 2 for s in box], dtype=np.float32)
    d = depth.ravel()[idx]
    ok = idx[(d >= 0.5 * d.max()) & (d <= 0.85 * d.max())]
    pick = rng.choice(ok) if ok.size else idx[np.argmax(d)]
    return np.array(np.unravel_index(pick, half.shape), dtype=np.float32) * 2 + 0.5


def place_nuclei(rng: np.random.Generator, instances: np.ndarray, labels: np.ndarray, ideal: np.ndarray,
                 opts: EMOptions) -> None:
    """One nucleus per cell: the ``nucleus_fraction`` of the cell's voxels nearest (in a noise-warped
    ellipsoidal metric) to an off-centre point, 3 voxels clear of the membrane, largest piece kept.
    Writes NUCLEUS into ``labels`` and chromatin texture and envelope into ``ideal`` (in place)."""
    half = instances[::2, ::2, ::2]
    depth = ndi.distance_transform_edt((half > 0) & ~find_boundaries(half, mode="inner")) * 2.0
    free = ndi.binary_erosion(labels == CYTOPLASM, iterations=3, border_value=1)
    for cell, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        centre = _nucleus_centre(rng, half, depth, cell, box)
        in_cell = instances[box] == cell
        eligible = in_cell & free[box]
        if not eligible.any():
            eligible = in_cell & (labels[box] == CYTOPLASM)
        semi_axes = rng.uniform(0.8, 1.25, size=3)
        e = sum(((g - c) / a) ** 2 for g, c, a in zip(_box_grid(box), centre, semi_axes))
        e = np.sqrt(e) + 2.5 * _smooth_noise(rng, in_cell.shape, 12.0)  # a few voxels of smooth warp
        target = int(opts.nucleus_fraction * np.count_nonzero(in_cell))
        values = e[eligible]
        if 0 < target < values.size:
            eligible &= e < np.partition(values, target)[target]
        labels[box][_largest_component(eligible)] = NUCLEUS
    nucleus = labels == NUCLEUS
    envelope = nucleus & ~ndi.binary_erosion(nucleus, border_value=1)
    periphery = nucleus & ~ndi.binary_erosion(nucleus, iterations=3, border_value=1)
    clumps = nucleus & (_smooth_noise(rng, labels.shape, 2.0) + 0.8 * periphery > 0.7)
    ideal[nucleus] = GREY["nucleoplasm"]
    ideal[clumps] = GREY["chromatin"]
    ideal[envelope] = GREY["envelope"]


def _capsule_distance(path: np.ndarray, reach: float, shape: tuple[int, ...], step: int = 1):
    """Distance of the voxels of a box around a polyline ``path`` (k, 3) to the polyline, and the arc
    length of their nearest point, on a grid of ``shape`` whose voxels are ``step`` full-res voxels apart.
    Returns (box, dist, arc) or None if the box is empty."""
    lo = np.maximum(np.floor((path.min(0) - reach) / step).astype(int), 0)
    hi = np.minimum(np.ceil((path.max(0) + reach) / step).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grid = [g * step for g in _box_grid(box)]
    best, arc, travelled = np.inf, 0.0, 0.0
    for a, b in zip(path[:-1], path[1:]) if len(path) > 1 else [(path[0], path[0])]:
        v = b - a
        length2 = float(v @ v)
        t = sum((g - ai) * vi for g, ai, vi in zip(grid, a, v)) / length2 if length2 else 0.0
        t = np.clip(t, 0.0, 1.0)
        d2 = sum((g - ai - t * vi) ** 2 for g, ai, vi in zip(grid, a, v))
        closer = d2 < best
        best = np.where(closer, d2, best)
        arc = np.where(closer, travelled + t * np.sqrt(length2), arc)
        travelled += np.sqrt(length2)
    return box, np.sqrt(best), arc


def _random_walk(rng: np.random.Generator, start: np.ndarray, opts: EMOptions) -> np.ndarray:
    """(k + 1, 3) vertices of a persistent random walk of k segments."""
    direction = rng.normal(size=3)
    points = [start]
    for _ in range(rng.integers(opts.mitochondria_segments[0], opts.mitochondria_segments[1] + 1)):
        direction = direction / np.linalg.norm(direction)
        points.append(points[-1] + rng.uniform(*opts.segment_length) * direction)
        direction = direction + 0.6 * rng.normal(size=3)
    points = np.array(points, dtype=np.float32)
    return points - points.mean(axis=0) + start  # centred on the start point


def _clear_prefix(depth: np.ndarray, path: np.ndarray, need: float) -> np.ndarray | None:
    """Longest prefix of ``path`` whose points all have ``depth`` (half-resolution map of the distance to
    the nearest non-cytoplasm voxel) >= ``need``; None if not even the first segment (or point) is clear."""
    upper = np.array(depth.shape) - 1
    keep = 0
    for i, (a, b) in enumerate(zip(path[:-1], path[1:]) if len(path) > 1 else [(path[0], path[0])]):
        points = a + np.linspace(0.0, 1.0, int(np.linalg.norm(b - a)) + 2)[:, None] * (b - a)
        if depth[tuple(np.clip(np.rint(points / 2).astype(int), 0, upper).T)].min() < need:
            break
        keep = i + 2
    return path[: min(keep, len(path))] if keep else None


def _fitting_prefix(labels: np.ndarray, path: np.ndarray, radius: float):
    """The longest prefix of ``path`` whose capsule of ``radius`` plus a 1-voxel margin lies in cytoplasm,
    as (prefix, box, dist, arc); None if not even the first segment fits."""
    for end in range(len(path), 1 if len(path) > 1 else 0, -1):
        found = _capsule_distance(path[:end], radius + 2, labels.shape)
        if found is not None and np.all(labels[found[0]][found[1] <= radius + 1] == CYTOPLASM):
            return (path[:end],) + found
    return None


def _place_objects(rng: np.random.Generator, labels: np.ndarray, target: float, mean_volume: float,
                   make_path, radius_range: tuple[float, float], extra: float, paint) -> None:
    """Random sequential placement of capsule-shaped objects in cytoplasm until ``target`` voxels are covered.

    An object covers the voxels within ``r + extra`` of the polyline ``make_path(centre)``. A half-resolution
    map of the distance to the nearest non-cytoplasm voxel (updated as objects are drawn) trims each path
    to its part that fits; an exact check then keeps the object only if it and a 1-voxel margin around it
    are cytoplasm, so objects never touch each other or other classes. ``paint(box, body, dist, arc, r)``
    draws an accepted object."""
    depth = ndi.distance_transform_edt(labels[::2, ::2, ::2] == CYTOPLASM).astype(np.float32) * 2.0
    placed, attempts, max_attempts = 0, 0, 20 * int(target / mean_volume) + 200
    while placed < target and attempts < max_attempts:
        if attempts % 100 == 0:  # centres where an object of the largest radius still fits
            candidates = np.flatnonzero(depth >= radius_range[1] + extra + 1)
            if not candidates.size:
                break
        attempts += 1
        centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], depth.shape)) * 2.0
        r = rng.uniform(*radius_range)
        path = _clear_prefix(depth, make_path(centre + rng.random(3) * 2.0 - 0.5), r + extra + 1)
        found = None if path is None else _fitting_prefix(labels, path, r + extra)
        if found is None:
            continue
        path, box, dist, arc = found
        body = dist <= r + extra
        paint(box, body, dist, arc, r)
        placed += np.count_nonzero(body)
        near = _capsule_distance(path, 2 * (r + extra) + 4, depth.shape, step=2)
        if near is not None:
            depth[near[0]] = np.minimum(depth[near[0]], np.maximum(near[1] - r - extra, 0.0))


def place_mitochondria(rng: np.random.Generator, labels: np.ndarray, ideal: np.ndarray, opts: EMOptions) -> None:
    """Mitochondria: capsules of radius r along short random walks, with a dark rim (outer 0.8 voxel)
    and dark cristae striped across the long axis every ``cristae_period`` voxels (in place)."""
    def paint(box, body, dist, arc, r):
        crista = np.mod(arc, opts.cristae_period) < 0.4 * opts.cristae_period
        texture = np.where(dist > r - 0.8, GREY["mito_rim"], np.where(crista, GREY["cristae"], GREY["matrix"]))
        labels[box][body] = MITOCHONDRIA
        ideal[box] = np.where(body, texture, ideal[box])

    r_mean = np.mean(opts.mitochondria_radius)
    length = np.mean(opts.segment_length) * np.mean(opts.mitochondria_segments)
    target = opts.mitochondria_fraction * np.count_nonzero(labels)
    _place_objects(rng, labels, target, np.pi * r_mean**2 * length, lambda c: _random_walk(rng, c, opts),
                   opts.mitochondria_radius, 0.0, paint)


def place_granules(rng: np.random.Generator, labels: np.ndarray, ideal: np.ndarray, opts: EMOptions) -> None:
    """Granules: a dense core of radius r (as dark as membrane) in a pale halo ``halo_width`` thick;
    the label covers core and halo (in place)."""
    def paint(box, body, dist, arc, r):
        labels[box][body] = GRANULES
        ideal[box] = np.where(dist <= r, GREY["granule_core"], np.where(body, GREY["granule_halo"], ideal[box]))

    r_mean = np.mean(opts.granule_radius) + opts.halo_width
    target = opts.granules_fraction * np.count_nonzero(labels)
    _place_objects(rng, labels, target, 4 / 3 * np.pi * r_mean**3, lambda c: c[None].astype(np.float32),
                   opts.granule_radius, opts.halo_width, paint)


def paint_base_textures(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """(Z, Y, X) float32 noise-free image of outside, cytoplasm (ribosome speckle) and membrane."""
    coarse = _smooth_noise(rng, labels.shape, 5.0)
    speckle = _smooth_noise(rng, labels.shape, 0.7) > 1.3
    ideal = GREY["cytoplasm"] + 0.04 * coarse
    ideal[speckle] = GREY["ribosome"]
    outside = labels == OUTSIDE
    ideal[outside] = GREY["outside"] + 0.02 * coarse[outside]
    ideal[labels == MEMBRANE] = GREY["membrane"]
    return ideal


def misalign_slices(rng: np.random.Generator, arrays: list[np.ndarray], sigma: float) -> list[np.ndarray]:
    """Shift every Z slice of every array by the same random integer (y, x) offset ~ N(0, sigma)."""
    shifts = np.rint(rng.normal(0.0, sigma, size=(arrays[0].shape[0], 2))).astype(int)
    out = []
    for a in arrays:
        b = np.empty_like(a)
        for z, shift in enumerate(shifts):
            b[z] = ndi.shift(a[z], shift, order=0, mode="nearest")
        out.append(b)
    return out


def form_image(rng: np.random.Generator, blurred: np.ndarray, opts: EMOptions) -> np.ndarray:
    """Slow illumination gain, Poisson shot noise and Gaussian read noise; (Z, Y, X) float -> uint8."""
    shape = blurred.shape
    direction = rng.normal(size=3)
    ramp = sum(g / max(s - 1, 1) * d for g, s, d in zip(_box_grid(tuple(slice(0, s) for s in shape)),
                                                          shape, direction / np.abs(direction).sum()))
    ramp = ramp - ramp.mean()
    gain = 1 + opts.illumination * (ramp + 0.1 * _smooth_noise(rng, shape, max(shape) / 2))
    signal = np.clip(blurred * gain, 0.0, 1.0)
    if opts.noise > 0:
        photons = opts.photons / opts.noise**2
        signal = rng.poisson(signal * photons).astype(np.float32) / photons
        signal += rng.standard_normal(shape, dtype=np.float32) * (opts.read_noise * opts.noise)
    return np.clip(np.rint(signal * 255), 0, 255).astype(np.uint8)
