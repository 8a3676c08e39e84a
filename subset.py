"""What a loader reads: `ImageSubset`, a view of some of a dataset's images (a split's training or validation
side) with its own transform, decoded from the image cache when there is one, and batches handed over as one
copy out of a RAM cache when the transform only passes the pixels through; `FixedPixels`, images a deterministic
transform (validation's, inference's) made once into their final pixels, so later passes only copy them.

    python -c "import subset; help(subset.ImageSubset)"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import augmentation
import cache as cache_module
import imaging


class ImageSubset(Dataset):
    """A view of some of a dataset's images with its own transform (train and validation never share one)."""

    def __init__(
        self,
        dataset: Dataset,  # any dataset class above: reads its `labels` and `image_paths`
        indices: Sequence[int],
        transform: Callable,
        size: Sequence[int],
        cache: Any = None,
        targets: np.ndarray | None = None,
        extras: torch.Tensor | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.size = tuple(size)  # (H, W) images are decoded at, before the transform
        self.cache = cache  # cache.RamCache / DiskCache over the dataset's images, or None
        assert cache is None or cache[0].shape[:2] == self.size, "the cache holds images of the size decoded here"
        # What each image teaches, per image of the dataset (default: its labels): a class index, or (N, K) the
        # probabilities to learn (--pseudo_soft, --age_sigma), handed over in place of the class index.
        self.given_targets = targets
        chosen = np.asarray(dataset.labels if targets is None else targets)[self.indices]
        self.soft = torch.from_numpy(chosen.astype(np.float32)) if chosen.ndim == 2 else None
        self.targets = chosen.argmax(1) if chosen.ndim == 2 else chosen.astype(np.int64)  # class counts, sampling
        self.extras = extras  # per image of the subset, handed over third (--kd_cache: the teachers' logits)
        # When the transform would return the decoded pixels unchanged, batches skip it (see __getitems__).
        self.pixels_only = augmentation.passes_pixels_through(transform, self.size)
        self.gather = self.pixels_only and hasattr(cache, "take")  # and a batch is one copy out of memory

    def __len__(self) -> int:
        return len(self.indices)

    def pixels(self, i: int) -> np.ndarray:
        """The i-th image before the transform: HxWx3 uint8 at `size`, from the cache when there is one."""
        j = int(self.indices[i])
        if self.cache is not None:
            return self.cache[j]
        return imaging.decode_fixed(self.dataset.image_paths[j], self.size)

    def target(self, i: int) -> int | torch.Tensor:
        return int(self.targets[i]) if self.soft is None else self.soft[i]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.transform(Image.fromarray(self.pixels(i))), self.target(i)
        return item if self.extras is None else (*item, self.extras[i])

    def __getitems__(self, items: Sequence[int]) -> list[tuple[Any, ...]]:
        """The samples of one batch, as a DataLoader fetches them: the same as `[self[i] for i in items]`, with
        the pixels of a pixels-only transform stacked directly (from a RAM cache: one copy)."""
        if not self.pixels_only:
            return [self[i] for i in items]
        rows = np.asarray(items, dtype=np.int64)
        if self.gather:
            pixels = self.cache.take(self.indices[rows])
        else:
            pixels = np.stack([self.pixels(i) for i in rows])
        targets = self.targets[rows].tolist() if self.soft is None else list(self.soft[rows])
        columns = [torch.from_numpy(pixels).permute(0, 3, 1, 2), targets]
        return list(zip(*columns, *([self.extras[rows]] if self.extras is not None else []), strict=True))


class FixedPixels(Dataset):
    """Images already at their final uint8 pixels (N, 3, H, W), with a target each, as `fixed_once` makes them: a
    pass over them decodes, crops and resizes nothing; `batches` hands them over as slices, without a copy."""

    gather = True  # loop.loader_workers: no worker processes

    def __init__(self, pixels: torch.Tensor, targets: Sequence[Any]) -> None:
        self.pixels, self.targets = pixels, torch.as_tensor(np.asarray(targets))

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        return self.pixels[i], self.targets[i].item()

    def batches(self, batch_size: int) -> FixedBatches:
        """What a validation or inference loader would give, in order: (pixels, targets) of `batch_size` images."""
        return FixedBatches(self, batch_size)


class FixedBatches:
    """Consecutive slices of a `FixedPixels`: an in-order loader whose batches are views (a DataLoader would stack
    the images one by one, which costs more than the pass it feeds on a busy CPU)."""

    def __init__(self, fixed: FixedPixels, batch_size: int) -> None:
        self.fixed, self.batch_size = fixed, batch_size

    def __len__(self) -> int:
        return -(-len(self.fixed) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.fixed), self.batch_size):
            end = start + self.batch_size
            yield self.fixed.pixels[start:end], self.fixed.targets[start:end]


def fixed_once(view: Dataset, transform: Any, workers: int, batch_size: int = 64) -> FixedPixels | None:
    """`view`'s items, (transform(image), target), made once into `FixedPixels` by a parallel pass over it, when
    its `transform` is deterministic and hands over uint8 pixels (ends in augmentation.to_uint8_tensor, as the
    loader part of every preset's eval transform does after split_for_device) and they take under a quarter of
    the available memory; else None, and the caller reads `view` as it is."""
    steps = transform.transforms if hasattr(transform, "transforms") else [transform]
    if not len(view) or steps[-1] is not augmentation.to_uint8_tensor:
        return None
    # Its own generator: a loader draws a seed when it starts, which must not move the run's random state.
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, num_workers=workers, generator=torch.Generator())
    pixels, targets = None, []
    for images, batch_targets in loader:
        if pixels is None:  # the size of every item, known from the first batch
            if len(view) * images[0].numel() >= cache_module.available_memory() // 4:
                return None
            pixels = torch.empty((len(view), *images.shape[1:]), dtype=torch.uint8)
        pixels[len(targets) : len(targets) + len(images)] = images
        targets.extend(batch_targets.tolist() if isinstance(batch_targets, torch.Tensor) else batch_targets)
    return FixedPixels(pixels, targets)
