"""Batches of augmented multi-channel images for pre-training, as an endless step-indexed stream.

The engine asks for the stream from a given step on (``open_stream(start)``); epochs are an implementation
detail here: the order of epoch ``e`` is the :class:`~micromae.data.seeded.SeededSampler` permutation
of ``(seed, e)`` and each item's augmentation draws from ``(seed, rank, e, index)``, so starting at step ``s``
gives exactly the batches an uninterrupted run sees from ``s`` on, without loading the skipped ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from micromae.config import PretrainConfig
from micromae.data.augment import DamaAugment
from micromae.data.multichannel import MultiChannelImageFolder
from micromae.data.run_folder import synthetic_mif_in_run
from micromae.data.seeded import SeededItems, SeededSampler
from micromae.data.torch_augment import SeededCrops, TorchDamaAugment
from micromae.errors import input_error


def build_image_dataset(cfg: PretrainConfig, run_dir: Path) -> MultiChannelImageFolder:
    """The multi-channel image folder of ``data.source`` ``images`` or ``synthetic_mif`` with DAMA's
    augmentation to ``model.img_size``, each file scaled to [0, 1] as ``data.normalize`` / ``data.percentiles``
    say (:func:`~micromae.data.multichannel.normalize_channels`); checks the channel count against
    ``model.in_chans``."""
    d = cfg.data
    if d.source == "synthetic_mif":
        folder = synthetic_mif_in_run(run_dir, d.n_images, d.synthetic_shape, d.synthetic_seed) / "images"
    else:
        if d.root is None:
            raise input_error("data.root", "a folder of multi-channel TIFFs", "nothing",
                              "Set data.root=/path/to/tiffs (and data.axes=CYX or YXC if the files do not say)")
        folder = Path(d.root)
    augment = DamaAugment(cfg.model.img_size, scale=d.crop_scale)
    dataset = MultiChannelImageFolder(folder, axes=d.axes, transform=augment, normalize=d.normalize,
                                      percentiles=tuple(d.percentiles))
    if dataset.num_channels != cfg.model.in_chans:
        raise input_error(f"images in '{folder}'", f"{cfg.model.in_chans} channels (model.in_chans)",
                          f"{dataset.num_channels} channels ({', '.join(dataset.channel_names)})",
                          f"Set model.in_chans={dataset.num_channels}")
    return dataset


def image_stream(dataset: Any, batch_size: int, start_step: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 device: torch.device | str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(step, images (B, C, H, W))`` for steps ``start_step, start_step + 1, ...`` forever.

    With ``device`` (``data.sampler=torch``): the loader only reads the images and cuts the crops of the
    dataset's ``DamaAugment`` draws; :class:`~micromae.data.torch_augment.TorchDamaAugment` augments the
    batch on ``device`` here (same draws, same images up to float rounding, so resume is unchanged)."""
    sampler = SeededSampler(len(dataset), seed, rank, world_size)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise input_error("image folder", f"at least {batch_size * world_size} images (one batch per process)",
                          f"{len(dataset)} images", "Add images or lower train.batch_size")
    on_device = None
    if device is not None:
        on_device = TorchDamaAugment(dataset.transform)
        items = SeededCrops(dataset, on_device, seed, rank)
        device = torch.device(device)
    else:
        items = SeededItems(dataset, seed, rank)
    epoch, skip = divmod(start_step, per_epoch)
    step = start_step
    while True:
        sampler.set_epoch(epoch)
        keys = list(sampler)[skip * batch_size: per_epoch * batch_size]
        loader = DataLoader(items, batch_size=batch_size, sampler=keys, num_workers=num_workers,
                            pin_memory=pin_memory, drop_last=True,
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + rank))
        for images, extra in loader:
            if on_device is not None:  # extra: the per-item params
                images = on_device.augment_crops(images.to(device, non_blocking=pin_memory), extra.to(device))
            yield step, images
            step += 1
        epoch, skip = epoch + 1, 0
