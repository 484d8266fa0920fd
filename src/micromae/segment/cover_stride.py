"""Pixel-resolution embeddings by MAESTER's "cover-and-stride", exact to the pixel.

Geometry (one axis; the other is the same). The encoder sees a field of view of ``F = g * p`` pixels: ``g``
tokens of ``p`` pixels. With ``central_tokens = c`` (``c <= g``, ``g - c`` even) let ``o = (g - c) / 2``; the
central tokens are those at grid positions ``o .. o + c - 1``. A token *centred on* pixel ``y`` has the
footprint rows ``y - h .. y - h + p - 1`` where ``h = (p - 1) // 2`` for odd ``p`` (an exact centre) and
``h = p / 2`` for even ``p`` (convention: the footprint spans ``y - p/2 .. y + p/2 - 1``, i.e. pixel ``y`` is
the lower of the two middle rows). The embedding of pixel ``y`` is the final-layer token centred on ``y``
computed in a window where that token is one of the central ones.

Cover-and-stride tiles the image with blocks of ``c * p`` pixels. Pixel ``y = Y0 + i' * p + r``
(block origin ``Y0``, ``0 <= i' < c``, shift ``0 <= r < p``) takes token ``o + i'`` of the window that starts
at ``Y0 - h - o * p + r``; so ``p**2`` windows per block (one per shift ``(ry, rx)``) give every one of its
``(c * p)**2`` pixels its own exactly centred token. For one shift, the windows of all blocks form a regular
grid of stride ``c * p``: they are strided views of the padded image (no copy until a chunk is encoded).

Padding: the image is extended by ``pad_mode`` ("reflect" (numpy's, edge not repeated; default),
"symmetric", "constant"/"zero" (zeros), "edge"/"replicate") so every window lies inside; image sizes need
not be multiples of ``c * p`` (the surplus pixels of the last blocks are never written). Out-of-image pixels
are computed coordinate by coordinate (:func:`pad_index`), so a tile read from a large image with its margin
is padded exactly as the whole image would be.

The public MAESTER code is misaligned (it strips CLS twice, pads 34 px instead of 32 and steps blocks every
19 px instead of 20, so pixel ``(y, x)`` gets the token centred on ``(y - 2, x + 3)``); this module follows
the definition above, and its tests prove it with encoders whose tokens reveal their footprint.

Memory: the padded image ``(S, C, Hp, Wp)`` (float32, about ``(H + F) * (W + F)`` per channel and slice),
one chunk of ``batch_size`` windows ``(batch_size, C, F, F)`` and its encoder activations (paper model, fp32,
256 windows: about 0.45 GB), and the output ``(S, D, H, W)`` in ``out_dtype``. The fast mode
(:mod:`micromae.segment.fast_modes`) adds a token grid and one (S, D, H, W / p) intermediate.

Why this module is over 400 lines: the geometry above, the lattice encoder and the naive reference
implementation (:func:`embed_pixels_naive`, one window per pixel) are kept together so that the reference
the tests compare with reads the same geometry as the fast path.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from micromae.data.normalize import scale_intensity
from micromae.errors import input_error
from micromae.runtime import eval_mode

__all__ = ["PixelGeometry", "AxisPlan", "encoder_geometry", "plan_axis", "pad_index", "block_size",
           "context_margin", "count_windows", "read_padded", "encode_windows", "encode_lattice",
           "embed_pixels", "embed_pixels_batch", "embed_pixels_region", "embed_pixels_naive", "RegionRead",
           "read_region", "embed_region", "auto_batch_size", "CompiledEncoder"]

MODES = ("exact", "fast")
PAD_MODES = {"reflect": "reflect", "symmetric": "symmetric", "constant": "constant", "zero": "constant",
             "zeros": "constant", "edge": "edge", "replicate": "edge"}


@dataclass(frozen=True)
class PixelGeometry:
    """Token size ``patch`` (p), token grid ``grid`` (gh, gw), ``central`` tokens (c) and the encoder's
    ``in_chans`` / ``embed_dim``, for ``mode`` "exact" or "fast"."""

    patch: int
    grid: tuple[int, int]
    central: int
    in_chans: int
    embed_dim: int
    mode: str

    @property
    def half(self) -> int:
        """``h``: a token centred on pixel ``y`` starts at ``y - h`` (``(p-1)//2`` odd p, ``p/2`` even p)."""
        return (self.patch - 1) // 2 if self.patch % 2 else self.patch // 2

    @property
    def block(self) -> int:
        """Block side ``c * p`` in pixels (exact mode) or window stride (both modes)."""
        return self.central * self.patch

    def offset(self, axis: int) -> int:
        """``o = (g - c) / 2``: grid index of the first central token along ``axis`` (0 rows, 1 columns)."""
        return (self.grid[axis] - self.central) // 2

    def fov(self, axis: int) -> int:
        """Window side ``F = g * p`` along ``axis``."""
        return self.grid[axis] * self.patch


@dataclass(frozen=True)
class AxisPlan:
    """Windows along one axis: ``n_blocks`` x ``n_shifts`` starts ``b * c * p + r`` in a padded axis of
    ``padded`` pixels whose index 0 is region coordinate ``-before``; ``lattice`` output samples (pixels in
    exact mode, tokens in fast mode)."""

    n_blocks: int
    n_shifts: int
    lattice: int
    before: int
    padded: int


def _attr(encoder: nn.Module, name: str) -> Any:
    """``encoder.<name>``, else ``encoder.patch_embed.<name>`` (timm VisionTransformer)."""
    if hasattr(encoder, name):
        return getattr(encoder, name)
    return getattr(encoder.patch_embed, name)


def encoder_geometry(encoder: nn.Module, central_tokens: int | None = None, mode: str = "exact") -> PixelGeometry:
    """Read p, grid, channels and width from ``encoder`` and check ``central_tokens`` for ``mode``.

    ``central_tokens=None`` means 4 in exact mode and ``g // 2`` in fast mode (half-overlapping windows;
    ``g // 2 + 1`` when ``g - g // 2`` is odd). Raises MicromaeInputError for a bad mode or ``c``.
    """
    if mode not in MODES:
        raise input_error("mode", f"one of {MODES}", repr(mode), "Use 'exact' (paper) or 'fast' (token grid)")
    patch = _attr(encoder, "patch_size")
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    if patch[0] != patch[1]:
        raise input_error("encoder patch_size", "square tokens", str(patch), "Use an encoder with p x p tokens")
    grid = tuple(int(g) for g in _attr(encoder, "grid_size"))
    in_chans = int(getattr(encoder, "in_chans", None) or encoder.patch_embed.proj.in_channels)
    g = min(grid)
    if central_tokens is None:
        central_tokens = 4 if mode == "exact" else g // 2 + (g - g // 2) % 2
    c = central_tokens
    if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= g or any((gi - c) % 2 for gi in grid):
        valid = [v for v in range(1, g + 1) if not any((gi - v) % 2 for gi in grid)]
        raise input_error("central_tokens", f"an int in 1..{g} with grid {grid} minus it even", repr(c),
                          f"For a {grid[0]}x{grid[1]} token grid use one of {valid}")
    return PixelGeometry(patch[0], grid, c, in_chans, int(encoder.embed_dim), mode)


def plan_axis(geom: PixelGeometry, axis: int, n: int) -> AxisPlan:
    """Windows needed along ``axis`` for a region of ``n`` pixels.

    Exact: ``ceil(n / cp)`` blocks x ``p`` shifts; window ``(b, r)`` starts at region coordinate
    ``b*c*p + r - h - o*p``. Fast: one shift; token ``k`` of the lattice is centred on region coordinate
    ``(k - 1) * p + h`` (one token before the region and at least one after, for interpolation).
    """
    p, c, o = geom.patch, geom.central, geom.offset(axis)
    if geom.mode == "exact":
        n_blocks, n_shifts, lattice, before = math.ceil(n / (c * p)), p, n, geom.half + o * p
    else:
        lattice = (n - 1 + p - geom.half) // p + 2
        n_blocks, n_shifts, before = math.ceil(lattice / c), 1, p + o * p
    padded = (n_blocks - 1) * c * p + (n_shifts - 1) + geom.fov(axis)
    return AxisPlan(n_blocks, n_shifts, lattice, before, padded)


def block_size(encoder: nn.Module, central_tokens: int | None = None, mode: str = "exact") -> int:
    """Tile alignment ``c * p``: regions starting at multiples of it give the same result as the whole image."""
    return encoder_geometry(encoder, central_tokens, mode).block


def context_margin(encoder: nn.Module, central_tokens: int | None = None, mode: str = "exact") -> tuple[int, int]:
    """``(before, after)``: pixels of context read before the first and after the last pixel of a region
    whose side is a multiple of :func:`block_size` (the largest over both axes). Exact mode:
    ``(h + o*p, o*p + p - 1 - h)``. A region of another size reads up to ``c*p - 1`` more after it."""
    geom = encoder_geometry(encoder, central_tokens, mode)
    plans = [plan_axis(geom, axis, geom.block * 4) for axis in (0, 1)]
    return max(pl.before for pl in plans), max(pl.padded - pl.before - geom.block * 4 for pl in plans)


def count_windows(height: int, width: int, encoder: nn.Module, central_tokens: int | None = None,
                  mode: str = "exact") -> int:
    """Number of encoder windows (forward passes of one FOV) to embed one ``height x width`` image."""
    geom = encoder_geometry(encoder, central_tokens, mode)
    py, px = plan_axis(geom, 0, int(height)), plan_axis(geom, 1, int(width))
    return py.n_blocks * py.n_shifts * px.n_blocks * px.n_shifts


def pad_index(coords: np.ndarray, n: int, pad_mode: str) -> np.ndarray:
    """Source index, in ``0..n-1``, of each (any integer) coordinate of an axis of length ``n``, as
    ``numpy.pad`` would fill it (``-1`` where "constant" padding puts a zero). ``coords``: int array."""
    coords = np.asarray(coords, dtype=np.int64)
    kind = PAD_MODES[pad_mode]
    if kind == "constant":
        return np.where((coords >= 0) & (coords < n), coords, -1)
    if kind == "edge" or n == 1:
        return np.clip(coords, 0, n - 1)
    period = 2 * (n - 1) if kind == "reflect" else 2 * n
    m = coords % period
    return np.where(m < n, m, period - m - (kind == "symmetric"))


def _check_pad_mode(pad_mode: str) -> str:
    if pad_mode not in PAD_MODES:
        raise input_error("pad_mode", f"one of {tuple(PAD_MODES)}", repr(pad_mode),
                          "Use 'reflect' (default) or 'constant' (zeros)")
    return pad_mode


def _as_float_tensor(block: Any, intensity_range: tuple[float, float] | None, device: torch.device) -> torch.Tensor:
    """A read block as a float32 tensor on ``device``, scaled by ``intensity_range`` when given."""
    t = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(block))
    if intensity_range is None and not t.is_floating_point():
        raise input_error("image", "float values scaled to [0, 1]", f"dtype {t.dtype}",
                          "Scale it first (micromae.data.normalize.scale_intensity) or pass intensity_range")
    t = t.to(device)
    if intensity_range is not None:
        return scale_intensity(t, *intensity_range)
    return t.to(torch.float32)


def read_padded(source: Any, ys: np.ndarray, xs: np.ndarray, pad_mode: str = "reflect",
                intensity_range: tuple[float, float] | None = None, device: torch.device | str = "cpu"
                ) -> torch.Tensor:
    """Read the pixels at coordinates ``ys x xs`` (any integers, padded by ``pad_mode``) of a lazy image.

    source: array-like ``(H, W)``, ``(C, H, W)`` or ``(S, C, H, W)`` with numpy-style slicing (numpy, torch,
    zarr, h5py); only the bounding box of the in-image coordinates is read. Returns ``(S, C, len(ys),
    len(xs))`` float32 on ``device``.
    """
    shape = tuple(int(s) for s in source.shape)
    lead = {2: (1, 1), 3: (1, shape[0]), 4: shape[:2]}[len(shape)]
    iy, ix = pad_index(ys, shape[-2], pad_mode), pad_index(xs, shape[-1], pad_mode)
    boxes = [(int(i[i >= 0].min()), int(i[i >= 0].max()) + 1) if (i >= 0).any() else (0, 0) for i in (iy, ix)]
    (ya, yb), (xa, xb) = boxes
    block = _as_float_tensor(source[..., ya:yb, xa:xb], intensity_range, torch.device(device))
    block = torch.nn.functional.pad(block.reshape(*lead, yb - ya, xb - xa), (0, 1, 0, 1))  # zero row/col last
    ry = torch.as_tensor(np.where(iy >= 0, iy - ya, yb - ya), device=block.device)
    rx = torch.as_tensor(np.where(ix >= 0, ix - xa, xb - xa), device=block.device)
    return block.index_select(2, ry).index_select(3, rx).contiguous()


def encode_windows(encoder: nn.Module, windows: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """Final-layer patch tokens of ``windows`` ``(n, C, F, F)`` as ``(n, gh, gw, D)`` (prefix tokens dropped);
    bf16 autocast on CUDA when ``amp``."""
    cuda = windows.device.type == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and cuda) else nullcontext()
    with ctx:
        tokens = encoder.forward_features(windows)
    gh, gw = (int(g) for g in _attr(encoder, "grid_size"))
    return tokens[:, tokens.shape[1] - gh * gw:].reshape(windows.shape[0], gh, gw, -1)


def encode_lattice(encoder: nn.Module, padded: torch.Tensor, geom: PixelGeometry, plans: tuple[AxisPlan, AxisPlan],
                   out: torch.Tensor, batch_size: int = 256, amp: bool = True, progress: bool = False) -> None:
    """Encode every window of ``plans`` and write each window's central ``c x c`` tokens into ``out``.

    padded: ``(S, C, Hp, Wp)`` contiguous, index 0 at region coordinate ``-plan.before``. out: ``(S, D, Ly,
    Lx)``; window ``(s, by, ry, bx, rx)`` writes its central token ``(i', j')`` to lattice position
    ``((by*c + i')*nSy + ry, (bx*c + j')*nSx + rx)`` when inside ``Ly x Lx``. All windows of all slices and
    shifts are batched together, ``batch_size`` per forward pass.
    """
    py, px = plans
    c = geom.central
    (oy, ox), (fy, fx) = (geom.offset(0), geom.offset(1)), (geom.fov(0), geom.fov(1))
    s0, s1, s2, s3 = padded.stride()
    step_y, step_x = c * geom.patch * s2, c * geom.patch * s3
    shape5 = (padded.shape[0], py.n_blocks, py.n_shifts, px.n_blocks, px.n_shifts)
    windows = padded.as_strided((*shape5, padded.shape[1], fy, fx), (s0, step_y, s2, step_x, s3, s1, s2, s3))
    out_hwd = out.permute(0, 2, 3, 1)  # (S, Ly, Lx, D) view
    total, dev = math.prod(shape5), padded.device
    ar_c = torch.arange(c, device=dev)
    starts = range(0, total, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="cover-and-stride", unit="batch")
    for start in starts:
        ids = torch.arange(start, min(start + batch_size, total), device=dev)
        s, by, ry, bx, rx = torch.unravel_index(ids, shape5)
        tokens = encode_windows(encoder, windows[s, by, ry, bx, rx], amp)[:, oy:oy + c, ox:ox + c]  # (n, c, c, D)
        rows = (by[:, None] * c + ar_c) * py.n_shifts + ry[:, None]  # (n, c)
        cols = (bx[:, None] * c + ar_c) * px.n_shifts + rx[:, None]
        keep = (rows < out.shape[2])[:, :, None] & (cols < out.shape[3])[:, None, :]  # (n, c, c)
        index = [t[keep].to(out.device) for t in torch.broadcast_tensors(s[:, None, None], rows[:, :, None],
                                                                          cols[:, None, :])]
        out_hwd[index[0], index[1], index[2]] = tokens[keep].to(device=out.device, dtype=out.dtype)


def _encoder_device(encoder: nn.Module) -> torch.device:
    return next(encoder.parameters()).device


def _check_region(shape: tuple[int, ...], y0: int, x0: int, height: int, width: int) -> None:
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (y0, x0, height, width))
    if not ok or height < 1 or width < 1 or y0 < 0 or x0 < 0 or y0 + height > shape[-2] or x0 + width > shape[-1]:
        raise input_error("region", f"ints with 0 <= y0, 0 <= x0, y0 + height <= {shape[-2]}, "
                          f"x0 + width <= {shape[-1]} and sizes >= 1", f"y0={y0!r}, x0={x0!r}, height={height!r}, "
                          f"width={width!r}", "Choose a rectangle inside the image")


def _check_source(source: Any, geom: PixelGeometry) -> tuple[int, ...]:
    shape = tuple(int(s) for s in getattr(source, "shape", ()))
    if len(shape) not in (2, 3, 4) or min(shape, default=0) < 1:
        raise input_error("image", "an array (H, W), (C, H, W) or (S, C, H, W) with sizes >= 1", str(shape),
                          "Pass one 2-D image, one multichannel image or a stack of slices")
    chans = 1 if len(shape) == 2 else shape[-3]
    if chans != geom.in_chans:
        raise input_error("image channels", f"{geom.in_chans} (the encoder's in_chans)", f"{chans} in {shape}",
                          "Pass an image with as many channels as the encoder was trained on")
    return shape


CPU_BATCH = 256  # windows per encoder pass on the CPU (and the CLI's default before auto existed)


def auto_batch_size(encoder: nn.Module, device: torch.device | str, fraction: float = 0.5,
                    largest: int = 8192) -> int:
    """Windows per encoder pass: 256 on the CPU; on CUDA as many as ``fraction`` of the free device memory
    holds, at a generous estimate of the activations of one window (80 bytes per token and channel: an fp32
    copy of the tokens, q, k, v, the attention output and the 4x MLP hidden layer, twice over), as a power of
    two in [64, ``largest``]."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    grid = tuple(int(g) for g in _attr(encoder, "grid_size"))
    tokens = math.prod(grid) + 1
    per_window = 80 * tokens * int(encoder.embed_dim)
    fit = max(64, int(fraction * free // per_window))
    return int(min(largest, 2 ** int(math.log2(fit))))


@dataclass(frozen=True)
class RegionRead:
    """A region read with its context margin and scaled, ready to encode: ``padded`` ``(S, C, Hp, Wp)``
    float32 (on the CPU in pinned memory when read ahead for a CUDA encoder), the geometry and the axis
    plans; ``height``, ``width`` of the region; ``stack``: the source was ``(S, C, H, W)``."""

    padded: torch.Tensor
    geom: PixelGeometry
    plans: tuple[AxisPlan, AxisPlan]
    height: int
    width: int
    stack: bool


def read_region(encoder: nn.Module, source: Any, y0: int, x0: int, height: int, width: int,
                central_tokens: int | None = None, mode: str = "exact", pad_mode: str = "reflect",
                intensity_range: tuple[float, float] | None = None, device: torch.device | str | None = None,
                pin: bool = False) -> RegionRead:
    """Check and read what :func:`embed_pixels_region` encodes: the rectangle plus its margin, padded and
    scaled, on ``device`` (default: the encoder's); ``pin``: into pinned host memory (for a non-blocking copy
    to the GPU later). Safe to call from a background thread while the encoder runs."""
    geom = encoder_geometry(encoder, central_tokens, mode)
    shape = _check_source(source, geom)
    _check_region(shape, y0, x0, height, width)
    _check_pad_mode(pad_mode)
    plans = (plan_axis(geom, 0, height), plan_axis(geom, 1, width))
    ys = np.arange(plans[0].padded) + (y0 - plans[0].before)
    xs = np.arange(plans[1].padded) + (x0 - plans[1].before)
    where = torch.device(device) if device is not None else _encoder_device(encoder)
    padded = read_padded(source, ys, xs, pad_mode, intensity_range, where)
    if pin and where.type == "cpu":
        padded = padded.pin_memory()
    return RegionRead(padded, geom, plans, height, width, len(shape) == 4)


@torch.inference_mode()
def embed_region(encoder: nn.Module, region: RegionRead, batch_size: int = 256,
                 device: torch.device | str | None = None, out_dtype: torch.dtype = torch.float32,
                 amp: bool = True, progress: bool = False) -> torch.Tensor:
    """Encode a :class:`RegionRead` (copied to the encoder's device, non-blocking from pinned memory);
    ``batch_size`` 0: :func:`auto_batch_size`. Returns as :func:`embed_pixels_region`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise input_error("batch_size", "an int >= 1 (or 0: chosen from free device memory)", repr(batch_size),
                          "Use e.g. 256 windows per pass")
    enc_dev = _encoder_device(encoder)
    batch_size = batch_size or auto_batch_size(encoder, enc_dev)
    out_dev = torch.device(device) if device is not None else enc_dev
    geom, plans = region.geom, region.plans
    padded = region.padded.to(enc_dev, non_blocking=True)
    n_slices, height, width = padded.shape[0], region.height, region.width
    with eval_mode(encoder):
        if geom.mode == "exact":
            out = torch.empty(n_slices, geom.embed_dim, height, width, dtype=out_dtype, device=out_dev)
            encode_lattice(encoder, padded, geom, plans, out, batch_size, amp, progress)
        else:
            from micromae.segment.fast_modes import embed_tokens_fast, upsample_tokens  # local: it imports us
            tokens = embed_tokens_fast(encoder, padded, geom, plans, out_dtype, out_dev, batch_size, amp, progress)
            out = upsample_tokens(tokens, geom, height, width)
    return out if region.stack else out[0]


@torch.inference_mode()
def embed_pixels_region(encoder: nn.Module, source: Any, y0: int, x0: int, height: int, width: int,
                        central_tokens: int | None = None, mode: str = "exact", pad_mode: str = "reflect",
                        batch_size: int = 256, device: torch.device | str | None = None,
                        out_dtype: torch.dtype = torch.float32, amp: bool = True,
                        intensity_range: tuple[float, float] | None = None, progress: bool = False) -> torch.Tensor:
    """Pixel embeddings of the rectangle ``[y0, y0+height) x [x0, x0+width)`` of a (lazily read) image.

    source: ``(H, W)``, ``(C, H, W)`` or ``(S, C, H, W)`` array-like with numpy slicing (numpy, torch, zarr,
    h5py), float in [0, 1] (or any numeric type with ``intensity_range=(lo, hi)``); only the region plus
    :func:`context_margin` is read, and the image border is padded by ``pad_mode`` exactly as for the whole
    image. With ``y0``, ``x0`` multiples of :func:`block_size` the result equals the whole-image result on
    the rectangle. mode: "exact" (cover-and-stride) or "fast" (:mod:`micromae.segment.fast_modes`).
    device: where the output lives (default: the encoder's device; the encoder runs where it is).
    batch_size: windows per encoder pass; 0 chooses it (:func:`auto_batch_size`).
    Returns ``(D, height, width)``, or ``(S, D, height, width)`` for a 4-D source, in ``out_dtype``.
    Reading and encoding are :func:`read_region` and :func:`embed_region` (segmentation overlaps them).
    """
    region = read_region(encoder, source, y0, x0, height, width, central_tokens, mode, pad_mode, intensity_range)
    return embed_region(encoder, region, batch_size, device, out_dtype, amp, progress)


class CompiledEncoder(nn.Module):
    """``encoder`` with ``forward_features`` compiled by ``torch.compile`` (dynamic batch size); every other
    attribute (geometry, ``embed_dim``, parameters) is the encoder's."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self._compiled = torch.compile(encoder.forward_features, dynamic=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.encoder, name)


def embed_pixels(encoder: nn.Module, image: Any, central_tokens: int | None = None, pad_mode: str = "reflect",
                 batch_size: int = 256, device: torch.device | str | None = None,
                 out_dtype: torch.dtype = torch.float32, progress: bool = False, mode: str = "exact",
                 amp: bool = True, intensity_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Embedding of every pixel of one image: ``(H, W)`` or ``(C, H, W)`` -> ``(D, H, W)``.

    ``image`` (numpy or torch) is in [0, 1]. ``central_tokens`` (default 4 exact, g/2 fast), ``mode``,
    ``pad_mode``, ``device`` and the rest: see :func:`embed_pixels_region`.
    """
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) not in (2, 3):
        raise input_error("image", "one image (H, W) or (C, H, W)", str(shape),
                          "Use embed_pixels_batch for a stack (S, C, H, W)")
    return embed_pixels_region(encoder, image, 0, 0, shape[-2], shape[-1], central_tokens, mode, pad_mode,
                               batch_size, device, out_dtype, amp, intensity_range, progress)


def embed_pixels_batch(encoder: nn.Module, images: Any, central_tokens: int | None = None, pad_mode: str = "reflect",
                       batch_size: int = 256, device: torch.device | str | None = None,
                       out_dtype: torch.dtype = torch.float32, progress: bool = False, mode: str = "exact",
                       amp: bool = True, intensity_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Embeddings of several same-size slices at once: ``(S, C, H, W)`` -> ``(S, D, H, W)`` (windows of all
    slices share the forward passes). Arguments as :func:`embed_pixels`."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4:
        raise input_error("images", "a stack (S, C, H, W)", str(shape), "Use embed_pixels for one image")
    return embed_pixels_region(encoder, images, 0, 0, shape[-2], shape[-1], central_tokens, mode, pad_mode,
                               batch_size, device, out_dtype, amp, intensity_range, progress)


def _naive_starts(n: int, geom: PixelGeometry, axis: int, position: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of an axis of length ``n``: grid index of its token and start of its own window."""
    y = np.arange(n)
    if isinstance(position, str):
        central = (y % geom.block) // geom.patch  # the central token cover-and-stride uses
    else:
        central = np.full(n, int(position[axis]))
    token = geom.offset(axis) + central
    return token, y - geom.half - token * geom.patch


@torch.inference_mode()
def embed_pixels_naive(encoder: nn.Module, image: Any, central_tokens: int | None = None, pad_mode: str = "reflect",
                       position: str | tuple[int, int] = "block", batch_size: int = 256) -> torch.Tensor:
    """Reference, one window per pixel: ``image`` ``(H, W)`` or ``(C, H, W)`` in [0, 1] -> ``(D, H, W)`` float32.

    Literally the definition: pixel ``(y, x)`` gets token ``(o + i', o + j')`` of its own window, which
    starts at ``(y - h - (o + i')*p, x - h - (o + j')*p)`` in the image padded by ``numpy.pad``.
    position: "block" uses ``i' = (y mod cp) // p`` (the central token cover-and-stride picks, so the
    results agree) or a fixed ``(i', j')`` in ``0..c-1`` (any central token is allowed by the definition;
    their contexts differ). Slow: ``H * W`` windows.
    """
    geom = encoder_geometry(encoder, central_tokens, "exact")
    shape = _check_source(image, geom)
    if len(shape) == 4:
        raise input_error("image", "one image (H, W) or (C, H, W)", str(shape), "Call it once per slice")
    if not isinstance(position, str) and not all(0 <= int(i) < geom.central for i in position):
        raise input_error("position", f"'block' or (i, j) in 0..{geom.central - 1}", repr(position),
                          "Pick one of the central tokens")
    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    img = img.reshape(-1, *img.shape[-2:])
    (ty, sy), (tx, sx) = (_naive_starts(n, geom, axis, position) for axis, n in enumerate(img.shape[1:]))
    fy, fx = geom.fov(0), geom.fov(1)
    pads = [(0, 0)] + [(int(max(0, -s.min())), int(max(0, s.max() + f - n)))
                       for s, f, n in ((sy, fy, img.shape[1]), (sx, fx, img.shape[2]))]
    padded = torch.from_numpy(np.pad(img, pads, mode=PAD_MODES[_check_pad_mode(pad_mode)]))
    views = padded.unfold(1, fy, 1).unfold(2, fx, 1)  # (C, ny, nx, F, F): the window starting at every pixel
    device = _encoder_device(encoder)
    yy, xx = (t.reshape(-1) for t in torch.meshgrid(torch.arange(img.shape[1]), torch.arange(img.shape[2]),
                                                     indexing="ij"))
    out = torch.empty(geom.embed_dim, img.shape[1], img.shape[2])
    with eval_mode(encoder):
        for start in range(0, yy.numel(), batch_size):
            y, x = yy[start:start + batch_size].numpy(), xx[start:start + batch_size].numpy()
            win = views[:, sy[y] + pads[1][0], sx[x] + pads[2][0]].transpose(0, 1)  # (n, C, F, F)
            tokens = encode_windows(encoder, win.contiguous().to(device), amp=False)  # (n, gh, gw, D)
            out[:, y, x] = tokens[torch.arange(len(y)), ty[y], tx[x]].float().cpu().T
    return out
