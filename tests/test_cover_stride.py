"""Tests of cover-and-stride pixel embeddings: exactness against a one-window-per-pixel reference, alignment
proved with encoders whose tokens reveal their footprint, coverage, tiles, batches and the fast modes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn as nn
import zarr
from timm.models.vision_transformer import VisionTransformer

from micromae.errors import MicromaeInputError
from micromae.models.vit import vit_maester, vit_tiny_test
from micromae.segment import (block_size, context_margin, count_windows, embed_pixels, embed_pixels_batch,
                              embed_pixels_naive, embed_pixels_region, pad_index)
from micromae.segment import cover_stride

H, W = 23, 31  # not multiples of any block size used here
SCIPY_MODE = {"reflect": "mirror", "constant": "constant", "edge": "nearest", "symmetric": "reflect"}


def _half(p: int) -> int:
    return (p - 1) // 2 if p % 2 else p // 2


def _encoder(p: int, g: int, in_chans: int = 1, **kw) -> nn.Module:
    return vit_tiny_test(img_size=g * p, patch_size=p, in_chans=in_chans, **kw)


def _reveal_encoder(p: int, g: int, in_chans: int = 1, kind: str = "centre") -> nn.Module:
    """Blocks are identity, no position embedding, no final norm: token dim ``k`` of channel ``k`` is the
    pixel at the footprint centre ("centre": footprint row/col ``h``) or the footprint mean ("mean")."""
    enc = _encoder(p, g, in_chans, pos_embed_weight=0.0)
    with torch.no_grad():
        for blk in enc.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        w = enc.patch_embed.proj.weight  # (D, C, p, p)
        w.zero_()
        enc.patch_embed.proj.bias.zero_()
        for ch in range(in_chans):
            if kind == "centre":
                w[ch, ch, _half(p), _half(p)] = 1.0
            else:
                w[ch, ch] = 1.0 / (p * p)
    enc.norm = nn.Identity()
    return enc


def _image(c: int = 1, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((c, h, w), dtype=np.float32)


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_pad_index_matches_numpy_pad_even_for_pads_larger_than_the_axis(mode: str, n: int) -> None:
    values = np.arange(1, n + 1)
    before, after = 3 * n + 2, 2 * n + 5
    expected = np.pad(values, (before, after), mode=mode)
    idx = pad_index(np.arange(-before, n + after), n, mode)
    got = np.where(idx >= 0, values[np.clip(idx, 0, n - 1)], 0)
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- exact = naive reference

CASES = [(5, 4, 2, 1), (5, 4, 4, 1), (3, 6, 2, 1), (3, 6, 4, 1), (4, 4, 2, 1), (5, 4, 2, 2)]


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
@pytest.mark.parametrize("p,g,c,chans", CASES)
def test_exact_mode_equals_one_window_per_pixel_reference(p: int, g: int, c: int, chans: int, pad_mode: str) -> None:
    enc = _encoder(p, g, chans)
    img = _image(chans)
    got = embed_pixels(enc, img, central_tokens=c, pad_mode=pad_mode, batch_size=37)
    ref = embed_pixels_naive(enc, img, central_tokens=c, pad_mode=pad_mode)
    assert got.shape == (enc.embed_dim, H, W)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c,pad_mode", [(8, "edge"), (12, "symmetric")])
def test_larger_central_regions_use_the_same_code_and_stay_exact(c: int, pad_mode: str) -> None:
    enc = _encoder(3, 12)
    img = _image(h=17, w=26)
    got = embed_pixels(enc, img, central_tokens=c, pad_mode=pad_mode)
    torch.testing.assert_close(got, embed_pixels_naive(enc, img, central_tokens=c, pad_mode=pad_mode),
                               atol=1e-5, rtol=1e-5)
    assert count_windows(17, 26, enc, c) < count_windows(17, 26, enc, 4)


@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (2, 9)])
def test_images_smaller_than_a_window_work_thanks_to_padding(shape: tuple[int, int]) -> None:
    enc = _encoder(5, 4)
    img = _image(1, *shape)[0]  # 2-D input
    got = embed_pixels(enc, img, central_tokens=2)
    assert got.shape == (enc.embed_dim, *shape)
    torch.testing.assert_close(got, embed_pixels_naive(enc, img, central_tokens=2), atol=1e-5, rtol=1e-5)


def test_any_central_token_is_allowed_but_their_contexts_differ() -> None:
    img = _image()
    real = _encoder(5, 4)
    a = embed_pixels_naive(real, img, central_tokens=2, position=(0, 0))
    b = embed_pixels_naive(real, img, central_tokens=2, position=(1, 1))
    assert not torch.allclose(a, b, atol=1e-3)  # other context, other position embedding
    reveal = _reveal_encoder(5, 4, kind="mean")
    for pos in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # a context-free token is the same from every position
        torch.testing.assert_close(embed_pixels_naive(reveal, img, 2, position=pos), embed_pixels(reveal, img, 2))


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("p,g,c,chans", CASES)
def test_each_pixel_gets_the_token_centred_on_it(p: int, g: int, c: int, chans: int) -> None:
    img = _image(chans)
    emb = embed_pixels(_reveal_encoder(p, g, chans), img, central_tokens=c).numpy()
    np.testing.assert_allclose(emb[:chans], img, atol=1e-6)
    assert np.all(emb[chans:] == 0)
    for axis, shift in [(1, 1), (1, -1), (2, 1), (2, -1)]:  # a one-pixel misalignment would be caught
        assert not np.allclose(emb[:chans], np.roll(img, shift, axis=axis), atol=1e-3)


def test_the_public_code_misalignment_would_fail() -> None:
    """The public code gives pixel (y, x) the token centred on (y - 2, x + 3)."""
    img = _image()
    emb = embed_pixels(_reveal_encoder(5, 16), img, central_tokens=4).numpy()[0]
    public = np.full_like(emb, np.nan)
    public[2:, :-3] = emb[:-2, 3:]  # public[y, x] = emb[y - 2, x + 3]
    np.testing.assert_allclose(emb, img[0], atol=1e-6)
    assert not np.allclose(public[2:, :-3], img[0, 2:, :-3], atol=1e-3)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "edge", "symmetric"])
@pytest.mark.parametrize("p,g,c", [(5, 4, 2), (4, 4, 2), (3, 6, 4)])
def test_footprint_mean_encoder_equals_a_box_filter(p: int, g: int, c: int, pad_mode: str) -> None:
    img = _image()
    emb = embed_pixels(_reveal_encoder(p, g, kind="mean"), img, central_tokens=c, pad_mode=pad_mode).numpy()[0]
    box = ndi.uniform_filter(img[0].astype(np.float64), size=p, mode=SCIPY_MODE[pad_mode], cval=0.0)
    np.testing.assert_allclose(emb, box, atol=1e-5)


# ---------------------------------------------------------------- coverage, batches, tiles


def test_every_pixel_is_computed_exactly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pixel IDs 1..H*W, zero padding, centre-revealing encoder: the central tokens of all encoded windows
    hold every pixel ID exactly once (out-of-image block pixels read 0), and the count is count_windows."""
    p, g, c = 5, 4, 2
    enc = _reveal_encoder(p, g)
    ids = np.arange(1, H * W + 1, dtype=np.float32).reshape(1, H, W)
    seen, n_windows = [], [0]
    real = cover_stride.encode_windows

    def spy(encoder: nn.Module, windows: torch.Tensor, amp: bool = True) -> torch.Tensor:
        tokens = real(encoder, windows, amp)
        o = (g - c) // 2
        seen.append(tokens[:, o:o + c, o:o + c, 0].reshape(-1))
        n_windows[0] += windows.shape[0]
        return tokens

    monkeypatch.setattr(cover_stride, "encode_windows", spy)
    emb = embed_pixels(enc, ids, central_tokens=c, pad_mode="constant", batch_size=50)
    counts = np.bincount(torch.cat(seen).round().long().numpy(), minlength=H * W + 1)
    assert np.all(counts[1:] == 1)
    assert n_windows[0] == count_windows(H, W, enc, c) == 3 * 4 * p * p  # ceil(23/10) * ceil(31/10) * p^2
    np.testing.assert_array_equal(emb[0].numpy(), ids[0])


def test_a_batch_of_slices_equals_slice_by_slice() -> None:
    enc = _encoder(5, 4, 2)
    stack = np.stack([_image(2, seed=s) for s in range(3)])  # (3, 2, H, W)
    got = embed_pixels_batch(enc, torch.from_numpy(stack), central_tokens=2, batch_size=64)
    assert got.shape == (3, enc.embed_dim, H, W)
    for s in range(3):
        torch.testing.assert_close(got[s], embed_pixels(enc, stack[s], central_tokens=2), atol=1e-5, rtol=1e-5)


class LazyImage:
    """Array-like that records the boxes it is asked for."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key: tuple) -> np.ndarray:
        self.reads.append(key)
        return self.data[key]


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("y0,x0,h,w", [(10, 20, 10, 10), (0, 10, 7, 13), (20, 20, 3, 11)])
def test_a_region_read_lazily_equals_the_whole_image_result(mode: str, y0: int, x0: int, h: int, w: int) -> None:
    enc = _encoder(5, 4)
    img = _image(h=31, w=45)
    assert block_size(enc, 2, mode) == 10  # so the region starts above are block-aligned
    full = embed_pixels(enc, img, central_tokens=2, mode=mode)
    lazy = LazyImage(img)
    tile = embed_pixels_region(enc, lazy, y0, x0, h, w, central_tokens=2, mode=mode)
    torch.testing.assert_close(tile, full[:, y0:y0 + h, x0:x0 + w], atol=1e-5, rtol=1e-5)
    before, after = context_margin(enc, 2, mode)
    (ys, xs) = lazy.reads[0][1:]
    block = block_size(enc, 2, mode)
    assert ys.start >= y0 - before and ys.stop <= y0 + -(-h // block) * block + after + block
    assert xs.start >= x0 - before and xs.stop <= x0 + -(-w // block) * block + after + block
    assert (ys.stop - ys.start) * (xs.stop - xs.start) < img.size  # not the whole image


def test_integer_source_with_intensity_range_equals_scaled_float_image() -> None:
    enc = _encoder(5, 4)
    raw = (np.random.default_rng(1).random((H, W)) * 255).astype(np.uint8)
    got = embed_pixels(enc, raw, central_tokens=2, intensity_range=(0.0, 255.0))
    torch.testing.assert_close(got, embed_pixels(enc, raw / np.float32(255.0), central_tokens=2))
    with pytest.raises(MicromaeInputError, match="intensity_range"):
        embed_pixels(enc, raw, central_tokens=2)
    store = zarr.create_array(store=zarr.storage.MemoryStore(), shape=raw.shape, chunks=(8, 8), dtype="uint8")
    store[:] = raw
    tile = embed_pixels_region(enc, store, 10, 10, 13, 21, central_tokens=2, intensity_range=(0.0, 255.0))
    torch.testing.assert_close(tile, got[:, 10:, 10:])


def test_a_timm_vision_transformer_with_the_same_weights_gives_the_same_embeddings() -> None:
    enc = _encoder(5, 4)
    vit = VisionTransformer(**enc.timm_kwargs)
    vit.load_state_dict(enc.to_timm_state_dict(), strict=True)
    img = _image()
    torch.testing.assert_close(embed_pixels(vit, img, central_tokens=2), embed_pixels(enc, img, central_tokens=2),
                               atol=1e-5, rtol=1e-5)


def test_training_mode_is_restored_and_ignored() -> None:
    enc = _encoder(5, 4, drop_path_rate=0.5).train()
    img = _image()
    a = embed_pixels(enc, img, central_tokens=2)
    assert enc.training
    torch.testing.assert_close(a, embed_pixels(enc.eval(), img, central_tokens=2))


# ---------------------------------------------------------------- fast mode


def test_fast_mode_at_token_centres_is_the_exact_token() -> None:
    """Token k of the fast grid is centred on pixel (k-1)p + h and computed at central position k mod c:
    where that position is 0 it equals the reference with position (0, 0)."""
    p, g = 5, 4
    enc = _encoder(p, g)
    img = _image()
    fast = embed_pixels(enc, img, mode="fast")  # default c = g / 2 = 2
    assert fast.shape == (enc.embed_dim, H, W)
    ref = embed_pixels_naive(enc, img, central_tokens=2, position=(0, 0))
    rows, cols = (np.array([(k - 1) * p + _half(p) for k in range(2, 20, 2) if (k - 1) * p + _half(p) < n])
                  for n in (H, W))
    assert len(rows) >= 2 and len(cols) >= 3
    sel = np.ix_(range(enc.embed_dim), rows, cols)
    torch.testing.assert_close(fast[sel], ref[sel], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p,g", [(5, 4), (4, 4), (3, 6)])
def test_fast_mode_places_tokens_at_footprint_centres(p: int, g: int) -> None:
    """Bilinear interpolation of a linear ramp is exact, so between the first and last token centres inside
    the image the fast embedding of a centre-revealing encoder is the ramp itself (a 1-px shift is off by 0.01)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = (0.01 * yy + 0.02 * xx)[None]
    fast = embed_pixels(_reveal_encoder(p, g), ramp, mode="fast").numpy()[0]
    h = _half(p)
    inner = np.s_[h:h + (H - 1 - h) // p * p + 1, h:h + (W - 1 - h) // p * p + 1]
    np.testing.assert_allclose(fast[inner], ramp[0][inner], atol=1e-5)


def test_fast_mode_approximates_exact_on_a_smooth_image_within_the_interpolation_bound() -> None:
    p, g, amp = 5, 4, 0.25
    wy, wx = np.pi / (H - 1), np.pi / (W - 1)  # zero slope at the borders: reflect padding stays smooth
    yy, xx = np.mgrid[0:H, 0:W]
    img = (0.5 + amp * np.cos(wy * yy) * np.cos(wx * xx)).astype(np.float32)
    enc = _reveal_encoder(p, g, kind="mean")
    exact = embed_pixels(enc, img, central_tokens=2).numpy()[0]
    fast = embed_pixels(enc, img, mode="fast").numpy()[0]
    bound = p * p / 8 * amp * (wy ** 2 + wx ** 2)  # linear interpolation error <= step^2 / 8 * |f''|
    err = np.abs(fast - exact).max()
    assert 0 < err <= bound


def test_fast_mode_needs_at_least_20x_fewer_windows_for_the_paper_geometry() -> None:
    enc = vit_maester()
    exact = count_windows(256, 256, enc)
    assert exact == 13 * 13 * 25  # ceil(256 / 20)^2 blocks x p^2 shifts
    assert exact >= 20 * count_windows(256, 256, enc, mode="fast")
    assert exact > count_windows(256, 256, enc, 8) > count_windows(256, 256, enc, 12)
    o = (16 - 4) // 2
    assert context_margin(enc) == (2 + o * 5, o * 5 + 5 - 1 - 2)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(central_tokens=6), "central_tokens"),   # > g = 4
    (dict(central_tokens=3), "central_tokens"),   # g - c odd
    (dict(central_tokens=True), "central_tokens"),
    (dict(central_tokens=2, pad_mode="wrap"), "pad_mode"),
    (dict(central_tokens=2, mode="slow"), "mode"),
    (dict(central_tokens=2, batch_size=-1), "batch_size"),  # 0 is auto (from free device memory)
])
def test_bad_options_raise_input_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(MicromaeInputError, match=match):
        embed_pixels(_encoder(5, 4), _image(), **kwargs)


def test_bad_images_and_regions_raise_input_errors() -> None:
    enc1, enc2 = _encoder(5, 4), _encoder(5, 4, 2)
    with pytest.raises(MicromaeInputError, match="channels"):
        embed_pixels(enc2, _image(1), central_tokens=2)
    with pytest.raises(MicromaeInputError, match="channels"):
        embed_pixels(enc1, _image(3), central_tokens=2)
    with pytest.raises(MicromaeInputError, match="embed_pixels_batch"):
        embed_pixels(enc1, _image(1)[None], central_tokens=2)
    with pytest.raises(MicromaeInputError, match="stack"):
        embed_pixels_batch(enc1, _image(1), central_tokens=2)
    with pytest.raises(MicromaeInputError, match="region"):
        embed_pixels_region(enc1, _image(1), 20, 0, 5, 5, central_tokens=2)
    with pytest.raises(MicromaeInputError, match="position"):
        embed_pixels_naive(enc1, _image(1), central_tokens=2, position=(2, 0))
