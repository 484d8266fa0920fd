"""How a synthetic multiplex immunofluorescence image is drawn: cell layout, marker patterns, image formation.

The steps of :func:`micromae.data.synthetic_mif.make_mif_image` (see that module's docstring for what the
image contains and why). Every function takes the generator ``rng`` and draws from it in a fixed order, so a
seed gives the same image bit for bit. Images are (C, H, W) in the channel order of
``synthetic_mif.CHANNELS``; ``ideal`` is the noise-free float32 signal in relative units (a cell's mean
marker level is 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import line as draw_line
from skimage.measure import label as label_regions

if TYPE_CHECKING:
    from micromae.data.synthetic_mif import MIFOptions

# Channel indices (synthetic_mif.CHANNELS) and cell-type indices (synthetic_mif.CELL_TYPES).
DAPI, HISTONES, NEUN, S100, OLIG2, IBA1, RECA1 = range(7)
NEURON, ASTROCYTE, OLIGODENDROCYTE, MICROGLIA, ENDOTHELIAL = range(5)
MARKER_OF_TYPE = (NEUN, S100, OLIG2, IBA1, RECA1)
MARKERS = (NEUN, S100, OLIG2, IBA1, RECA1)
N_CHANNELS, N_TYPES = 7, 5
# Soma size factor and (soma aspect, nucleus aspect) ranges per type: neurons large, oligodendrocytes small
# and round, microglia and endothelial cells elongated (endothelial cells line vessels).
SOMA_SCALE = (1.2, 1.0, 0.8, 0.85, 0.95)
SOMA_ASPECT = ((1.0, 1.35), (1.0, 1.3), (1.0, 1.2), (1.2, 1.7), (2.0, 3.0))
NUCLEUS_ASPECT = ((1.0, 1.25), (1.0, 1.3), (1.0, 1.15), (1.4, 1.9), (1.8, 2.6))


@dataclass
class Cell:
    """One cell body: a warped ellipse (soma) holding an off-centre elliptic nucleus.

    centre: (y, x) in pixels; radius: radius of the circle of equal area; angle: major-axis direction
    (radians, from the x axis towards y); warp: (3, 2) amplitude and phase of harmonics 2..4 of the border.
    """

    kind: int
    centre: np.ndarray
    radius: float
    aspect: float
    angle: float
    warp: np.ndarray
    nucleus_fraction: float
    nucleus_aspect: float
    nucleus_offset: np.ndarray

    def box(self, shape: tuple[int, int], margin: int = 2) -> tuple[slice, slice]:
        """The pixels that can hold the soma (clipped to the image)."""
        reach = self.radius * np.sqrt(self.aspect) * (1 + self.warp[:, 0].sum()) + margin
        lo = np.maximum(np.floor(self.centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(self.centre + reach).astype(int) + 1, shape)
        return slice(lo[0], hi[0]), slice(lo[1], hi[1])

    def fields(self, box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radii over ``box``: soma (<= 1 inside, 1 on the warped border) and nucleus (<= 1)."""
        y = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None]
        x = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :]
        c, s = np.cos(self.angle), np.sin(self.angle)

        def ellipse(centre: np.ndarray, radius: float, aspect: float) -> tuple[np.ndarray, np.ndarray]:
            dy, dx = y - centre[0], x - centre[1]
            u = (dx * c + dy * s) / (radius * np.sqrt(aspect))
            v = (dy * c - dx * s) * np.sqrt(aspect) / radius
            return np.hypot(u, v), np.arctan2(v, u)

        rho, phi = ellipse(self.centre, self.radius, self.aspect)
        border = 1.0 + sum(a * np.cos(k * phi + p) for k, (a, p) in enumerate(self.warp, start=2))
        rho_nucleus, _ = ellipse(self.centre + self.nucleus_offset, self.radius * self.nucleus_fraction,
                                 self.nucleus_aspect)
        return rho / border, rho_nucleus


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """(H, W) float32 noise with zero mean, unit std and correlation length ~``scale`` pixels."""
    if scale <= 4:
        field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), scale)
    else:  # smooth a coarse grid, then upsample linearly: cheap for long correlation lengths
        coarse = [max(3, int(np.ceil(n / scale)) + 2) for n in shape]
        field = ndi.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 1.0)
        field = ndi.zoom(field, [n / m for n, m in zip(shape, coarse)], order=1)[:shape[0], :shape[1]]
    field = field - field.mean()
    return (field / (field.std() + 1e-8)).astype(np.float32)


def lognormal(rng: np.random.Generator, sigma: float, size: int | tuple | None = None) -> np.ndarray:
    """Lognormal draws with mean 1 (log-mean -sigma^2/2)."""
    return rng.lognormal(-0.5 * sigma**2, sigma, size)


def draw_cells(rng: np.random.Generator, shape: tuple[int, int], n_cells: int, opts: MIFOptions) -> list[Cell]:
    """Types in balanced random order, sizes and shapes per type, centres by dart throwing.

    Two cells may overlap: centres are at least ``(1 - overlap) * (r_i + r_j)`` apart. A cell that finds no
    place in 100 tries is skipped.
    """
    kinds = rng.permutation(np.arange(n_cells) % N_TYPES)
    cells: list[Cell] = []
    centres = np.zeros((0, 2))
    radii = np.zeros(0)
    size = np.array(shape, dtype=float)
    for kind in kinds:
        radius = rng.uniform(*opts.soma_radius) * SOMA_SCALE[kind]
        margin = min(0.5 * radius, 0.25 * size.min())
        tries = margin + rng.random((100, 2)) * (size - 2 * margin)
        if len(centres):
            gap = np.linalg.norm(tries[:, None] - centres[None], axis=-1) - (1 - opts.overlap) * (radii + radius)
            free = np.flatnonzero((gap >= 0).all(axis=1))
        else:
            free = np.arange(1)
        if not len(free):
            continue
        centre = tries[free[0]]
        aspect = rng.uniform(*SOMA_ASPECT[kind])
        warp = np.stack([rng.uniform(0.0, 0.07, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
        fraction = rng.uniform(*opts.nucleus_fraction)
        offset = rng.uniform(-1, 1, 2) * (1 - fraction) * radius * 0.35
        cells.append(Cell(int(kind), centre, float(radius), float(aspect), float(rng.uniform(0, np.pi)), warp,
                          float(fraction), float(rng.uniform(*NUCLEUS_ASPECT[kind])), offset))
        centres = np.vstack([centres, centre])
        radii = np.append(radii, radius)
    return cells


def _render_instances(cells: list[Cell], order: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paint somata in z-``order`` (later on top); keep each cell's largest visible piece.

    Returns the (H, W) uint32 map of ids ``1 + index into cells`` and each cell's visible fraction of its
    in-frame soma.
    """
    instances = np.zeros(shape, dtype=np.uint32)
    full = np.zeros(len(cells))
    for i in order:
        box = cells[i].box(shape)
        soma = cells[i].fields(box)[0] <= 1.0
        full[i] = soma.sum()
        instances[box][soma] = i + 1
    visible = np.zeros(len(cells))
    for i, cell in enumerate(cells):
        box = cell.box(shape)
        own = instances[box] == i + 1
        pieces, count = label_regions(own, connectivity=1, return_num=True)
        if count > 1:
            largest = 1 + np.argmax(np.bincount(pieces.ravel())[1:])
            instances[box][own & (pieces != largest)] = 0
            own = pieces == largest
        visible[i] = own.sum() / max(full[i], 1.0)
    return instances, visible


def resolve_instances(rng: np.random.Generator, cells: list[Cell], shape: tuple[int, int],
                      min_visible: float) -> tuple[list[Cell], np.ndarray]:
    """Stack the cells in a random z-order and drop those less than ``min_visible`` visible.

    Returns the kept cells and the (H, W) uint32 instance map with ids 1..len(kept) (id = index + 1):
    exactly one id per pixel, each id one 4-connected region.
    """
    depth = rng.permutation(len(cells))  # z-level of each cell: higher is on top
    keep = np.ones(len(cells), dtype=bool)
    while True:
        kept = np.flatnonzero(keep)
        instances, visible = _render_instances([cells[i] for i in kept], np.argsort(depth[kept]), shape)
        if (visible >= min_visible).all():
            return [cells[i] for i in kept], instances
        keep[kept[visible < min_visible]] = False


def _walk(rng: np.random.Generator, start: np.ndarray, direction: float, steps: int, turn: float,
          step: float = 2.0) -> np.ndarray:
    """(steps + 1, 2) points of a persistent random walk (a process or a vessel centre line)."""
    angles = direction + np.cumsum(rng.normal(0.0, turn, steps))
    moves = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _draw_path(layer: np.ndarray, points: np.ndarray, w0: float, w1: float) -> None:
    """Draw a polyline into ``layer`` (max-composited), its weight falling linearly from w0 to w1."""
    h, w = layer.shape
    weights = np.linspace(w0, w1, len(points))
    ends = np.round(points).astype(int)
    for (r0, c0), (r1, c1), weight in zip(ends[:-1], ends[1:], weights[1:]):
        rr, cc = draw_line(r0, c0, r1, c1)
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        rr, cc = rr[inside], cc[inside]
        layer[rr, cc] = np.maximum(layer[rr, cc], weight)


def _processes(rng: np.random.Generator, layer: np.ndarray, cell: Cell, count: tuple[int, int],
               steps: tuple[int, int], turn: float, branch_p: float, level: float, depth: int = 1) -> None:
    """Processes radiating from the soma border, tapering, with side branches (``depth`` levels)."""
    for direction in rng.uniform(0, 2 * np.pi, rng.integers(*count)):
        start = cell.centre + 0.8 * cell.radius * np.array([np.sin(direction), np.cos(direction)])
        path = _walk(rng, start, direction, int(rng.integers(*steps)), turn)
        _draw_path(layer, path, level, 0.25 * level)
        if depth > 0 and rng.random() < branch_p:
            at = int(rng.integers(len(path) // 3, max(len(path) // 3 + 1, 2 * len(path) // 3)))
            side = direction + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
            branch = _walk(rng, path[at], side, max(2, (len(path) - at) // 2 + 2), turn)
            _draw_path(layer, branch, 0.7 * level, 0.2 * level)


def _vessel(rng: np.random.Generator, layer: np.ndarray, cell: Cell, level: float) -> None:
    """Two parallel walls of a capillary along the endothelial cell's major axis, through its soma."""
    half_width = cell.radius / np.sqrt(cell.aspect)
    length = int(rng.integers(12, 25))
    for direction in (cell.angle, cell.angle + np.pi):
        path = _walk(rng, cell.centre, direction, length, 0.08)
        step = np.gradient(path, axis=0)
        normal = np.stack([step[:, 1], -step[:, 0]], axis=1) / (np.linalg.norm(step, axis=1, keepdims=True) + 1e-6)
        for side in (-1.0, 1.0):
            _draw_path(layer, path + side * half_width * normal, level, 0.5 * level)


def _nuclear_texture(kind: int, rho_nucleus: np.ndarray, fine: np.ndarray, spots: np.ndarray,
                     nucleus: np.ndarray) -> np.ndarray:
    """Chromatin pattern per type, scaled to mean 1 inside the nucleus (so the type is not in the mean).

    Neurons: pale with bright chromocentres; oligodendrocytes: dense and even; microglia: heterochromatin
    at the periphery; astrocytes and endothelial cells: mottled.
    """
    if kind == NEURON:
        texture = 0.6 + 0.1 * fine + 1.2 * spots
    elif kind == OLIGODENDROCYTE:
        texture = 1.0 + 0.08 * fine
    elif kind == MICROGLIA:
        texture = 0.5 + 0.9 * np.clip(rho_nucleus, 0, 1) ** 3 + 0.15 * fine
    else:
        texture = 0.8 + 0.3 * fine + 0.3 * spots
    texture = np.clip(texture, 0.05, None)
    return texture / max(float(texture[nucleus].mean()), 1e-6) if nucleus.any() else texture


def paint_cells(rng: np.random.Generator, cells: list[Cell], shape: tuple[int, int],
                opts: MIFOptions) -> np.ndarray:
    """The noise-free (C, H, W) float32 signal of every cell: nuclear stains, its marker, off-target.

    Signals add up where cells overlap (as in a tissue section), whatever the instance map shows on top.
    """
    ideal = np.zeros((N_CHANNELS,) + shape, dtype=np.float32)
    layers = {m: np.zeros(shape, dtype=np.float32) for m in (NEUN, S100, IBA1, RECA1)}  # processes, vessels
    fine, spot_field = smooth_noise(rng, shape, 0.8), smooth_noise(rng, shape, 1.2)
    spots = (spot_field > 1.6).astype(np.float32)
    cyto_texture = smooth_noise(rng, shape, 2.0)
    sigma = opts.expression_sigma
    off_sigma = sigma if opts.off_target_sigma is None else opts.off_target_sigma
    for cell in cells:
        box = cell.box(shape)
        rho, rho_n = cell.fields(box)
        soma = (rho <= 1.0).astype(np.float32)
        nucleus = (rho_n <= 1.0) & (rho <= 1.0)
        nuc = nucleus.astype(np.float32)
        cyto = soma - nuc
        texture = _nuclear_texture(cell.kind, rho_n, fine[box], spots[box], nucleus)
        dapi = lognormal(rng, 0.3)
        histones = dapi ** 0.7 * lognormal(rng, 0.2)
        ideal[DAPI][box] += dapi * texture * nuc + 0.02 * dapi * cyto
        ideal[HISTONES][box] += histones * (0.8 * texture + 0.2 + 0.2 * fine[box]) * nuc
        level = lognormal(rng, sigma)
        if opts.dim_fraction > 0 and rng.random() < opts.dim_fraction:  # no draw otherwise: same default images
            level *= rng.uniform(*opts.dim_level)
        marker = MARKER_OF_TYPE[cell.kind]
        grain = 1.0 + 0.25 * cyto_texture[box]
        if cell.kind == NEURON:  # NeuN: nuclear, perinuclear cytoplasm fading outwards, a proximal dendrite
            pattern = nuc * (0.9 + 0.15 * fine[box]) + cyto * 0.55 * (1.3 - 0.6 * rho) * grain
            _processes(rng, layers[NEUN], cell, (1, 3), (4, 8), 0.15, 0.0, 0.35 * level, depth=0)
        elif cell.kind == ASTROCYTE:  # S100: cytoplasm and thick branching processes
            pattern = cyto * grain + 0.35 * nuc
            _processes(rng, layers[S100], cell, (4, 8), (6, 14), 0.25, 0.6, 0.8 * level)
        elif cell.kind == OLIGODENDROCYTE:  # Olig2: nuclear only
            pattern = nuc * (0.85 + 0.25 * fine[box]) + 0.03 * cyto
        elif cell.kind == MICROGLIA:  # Iba1: cytoplasm and thin, long, ramified processes
            pattern = 0.9 * cyto * grain + 0.4 * nuc
            _processes(rng, layers[IBA1], cell, (3, 7), (10, 20), 0.35, 0.9, 0.9 * level)
        else:  # endothelial, RECA1: membrane ring, faint cytoplasm, vessel walls beyond the soma
            ring = ((rho > 0.72) & (rho <= 1.0)).astype(np.float32)
            pattern = ring + 0.25 * cyto
            _vessel(rng, layers[RECA1], cell, 0.8 * level)
        ideal[marker][box] += level * pattern
        for other in MARKERS:
            if other != marker:
                ideal[other][box] += opts.off_target * lognormal(rng, off_sigma) * (cyto + 0.6 * nuc)
    for m in (NEUN, S100, RECA1):  # thick processes and vessel walls: widen the 1-pixel lines
        ideal[m] += 2.0 * ndi.gaussian_filter(layers[m], 0.8)
    ideal[IBA1] += layers[IBA1]  # thin processes stay 1 pixel wide before the optical blur
    return ideal


def form_image(rng: np.random.Generator, ideal: np.ndarray, opts: MIFOptions) -> np.ndarray:
    """Background, bleed-through, blur, Poisson-Gaussian noise, per-channel range: (C, H, W) -> uint16.

    Off-target tissue background is a smooth field per channel; channel ``c`` receives ``bleed * U(0.5,
    1.5)`` of each neighbouring channel ``c +- 1``; the blur grows slightly with the channel index (longer
    wavelengths); noise is Poisson at ``photons`` per unit level plus Gaussian read noise; channel ``c``
    maps level 1 to ``dynamic_range[c]`` grey values above ``offset[c]``, times a per-image gain (lognormal,
    sigma ``gain_sigma``: ~ +-15 % by default).
    """
    channels, shape = ideal.shape[0], ideal.shape[1:]
    background = np.stack([opts.background * np.clip(1 + 0.5 * smooth_noise(rng, shape, 40.0), 0.1, None)
                           for _ in range(channels)])
    mixing = np.eye(channels, dtype=np.float32)
    for c in range(channels - 1):
        mixing[c, c + 1], mixing[c + 1, c] = opts.bleed * rng.uniform(0.5, 1.5, 2)
    mixed = np.tensordot(mixing, ideal + background, axes=1).astype(np.float32)
    for c in range(channels):
        if opts.blur_sigma > 0:
            mixed[c] = ndi.gaussian_filter(mixed[c], opts.blur_sigma * (1 + 0.08 * c))
    if opts.noise > 0:
        photons = opts.photons / opts.noise**2
        mixed = rng.poisson(np.clip(mixed, 0, None) * photons).astype(np.float32) / photons
        mixed += rng.normal(0.0, opts.read_noise * opts.noise, mixed.shape).astype(np.float32)
    gain = np.asarray(opts.dynamic_range, np.float32) * lognormal(rng, opts.gain_sigma, channels).astype(np.float32)
    grey = np.asarray(opts.offset, np.float32)[:, None, None] + gain[:, None, None] * mixed
    return np.clip(np.round(grey), 0, 65535).astype(np.uint16)
