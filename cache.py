"""Decoded-image caches: every image is decoded once, at the size the transforms start from, then reused.

    python train.py --cache ram        # uint8 images in memory, shared by every loader worker
    python train.py --cache disk       # .npy files under --cache_dir, reused by later runs
    python train.py --cache none       # decode every image every epoch (the seed baseline's way)

A cache holds what `decode(path)` returns as an HxWx3 uint8 array; the dataset then applies its transform
to it exactly as it would to a freshly decoded image, so cached and uncached tensors are identical.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import mmap
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import devices
import settings
import utils

Decode = Callable[[str], np.ndarray]  # path -> HxWx3 uint8; raises on an unreadable file


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux /proc/meminfo; elsewhere physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_kind(kind: str, n_images: int, size: Sequence[int]) -> str:
    """`auto` is RAM when the cache takes under a quarter of the available memory, else disk."""
    if kind != "auto":
        return kind
    return "ram" if n_images * size[0] * size[1] * 3 < available_memory() // 4 else "disk"


def _decode_all(
    paths: Sequence[str],
    decode: Decode,
    store: Callable[[int, np.ndarray], None],
    workers: int,
    skip: Callable[[int], bool] = lambda i: False,
) -> dict[str, str]:
    """Decode `paths` with `workers` forked processes (threads where there is no fork), handing each image to
    `store`; returns {path: reason} of the unreadable ones. `store` runs in the worker: it must write to shared
    memory or to files."""

    def one(i: int) -> str | None:
        if skip(i):
            return None
        try:
            store(i, decode(paths[i]))
        except utils.UnreadableImageError as e:
            return e.reason
        return None

    workers = min(workers, utils.usable_cores())  # decoding is CPU-bound: more would only take turns
    if workers <= 1 or len(paths) < 2:
        reasons = dict(enumerate(map(one, range(len(paths)))))
    elif can_fork():
        reasons = _in_processes(one, len(paths), workers)
    else:
        with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while it decodes, not in between
            reasons = dict(enumerate(pool.map(one, range(len(paths)))))
    return {str(paths[i]): r for i, r in sorted(reasons.items()) if r is not None}


def can_fork() -> bool:
    """Forked workers see the parent's memory without pickling it (Linux; macOS forks unsafely)."""
    return sys.platform.startswith("linux")


_task: Callable[[int], str | None] | None = None  # what forked workers run: set just before the fork


def _run_range(bounds: tuple[int, int]) -> list[tuple[int, str | None]]:
    assert _task is not None
    return [(i, _task(i)) for i in range(*bounds)]


def _in_processes(task: Callable[[int], str | None], n: int, workers: int) -> dict[int, str | None]:
    """{i: task(i)} for i < n, run in `workers` forked processes in contiguous chunks (about 8 per worker):
    1.2x faster than threads on 2 cores (4658 against 3864 images/s), as decoding holds the GIL part of the time."""
    global _task
    chunk = max(1, -(-n // (8 * workers)))
    _task = task
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.imap_unordered(_run_range, [(i, min(i + chunk, n)) for i in range(0, n, chunk)])
            return dict(item for part in results for item in part)
    finally:
        _task = None


def shared_array(shape: Sequence[int], file: Path | None = None) -> np.ndarray:
    """A zeroed uint8 array in shared memory: what forked processes write there, the parent sees. With `file` (a new
    file in a memory file system, SHARED_DIR), other processes of the machine can attach it (`attach_array`)."""
    nbytes = int(np.prod(shape))
    if nbytes == 0:
        return np.zeros(shape, dtype=np.uint8)
    if file is None:
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8).reshape(shape)
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)  # a full /dev/shm fails here, not with SIGBUS at the first write
        return np.frombuffer(mmap.mmap(fd, nbytes), dtype=np.uint8).reshape(shape)
    finally:
        os.close(fd)  # the mapping keeps the memory


def attach_array(file: Path, shape: Sequence[int]) -> np.ndarray:
    """The array another process of this machine made with `shared_array(shape, file)`, mapped copy-on-write: its
    pages are that process's, shared; a write here (none is made) would stay in this process."""
    nbytes = int(np.prod(shape))
    if nbytes == 0:
        return np.zeros(shape, dtype=np.uint8)
    with open(file, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY), dtype=np.uint8).reshape(shape)


class RamCache:
    """All images in one (N, H, W, 3) uint8 array in shared memory, filled before the loaders start (by
    forked decoding processes where there is fork).

    Loader workers are forked from the training process and only read the array, so its pages are shared,
    not copied: memory does not grow with the number of workers.
    """

    kind = "ram"

    def __init__(
        self, paths: Sequence[str], size: Sequence[int], decode: Decode, workers: int = 1, file: Path | None = None
    ) -> None:
        """Decode `paths` into a new array; in `file` (SHARED_DIR) when other processes will attach it."""
        start = time.time()
        self.images = shared_array((len(paths), size[0], size[1], 3), file)
        self.rows: np.ndarray | None = None  # the rows of `images` this cache holds, in order (None: all)

        def store(i: int, image: np.ndarray) -> None:
            self.images[i] = image

        self.bad = _decode_all(paths, decode, store, workers)
        self.report = (
            f"RAM cache: {len(paths) - len(self.bad)} images, {self.images.nbytes / 2**20:.1f} MiB, "
            f"built in {time.time() - start:.1f}s"
        )

    @classmethod
    def attach(cls, file: Path, n: int, size: Sequence[int], bad: dict[str, str]) -> RamCache:
        """The cache another process of this machine built into `file`; nothing is decoded."""
        self = cls.__new__(cls)
        self.images, self.bad, self.rows = attach_array(file, (n, size[0], size[1], 3)), bad, None
        self.report = f"RAM cache: attached {n - len(bad)} images, {self.images.nbytes / 2**20:.1f} MiB, from {file}"
        return self

    def kept(self, mask: np.ndarray) -> RamCache:
        """This cache without the rows where `mask` is False (images removed from the dataset), over the same
        array: no copy, so the ranks of a machine still share one (a copy per rank was the cost of
        --skip_bad_images under torchrun); itself unchanged, for the next run of a sweep."""
        new = copy.copy(self)
        new.rows = np.flatnonzero(mask) if self.rows is None else self.rows[np.asarray(mask, dtype=bool)]
        return new

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The images at `indices` as one (len, H, W, 3) array: a batch in one copy out of shared memory."""
        return self.images[indices if self.rows is None else self.rows[indices]]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index if self.rows is None else self.rows[index]]

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)


class DiskCache:
    """One .npy file per image under `root`, named by a hash of the file's path, size and modification time
    and of the target size: a later run reuses it, and a changed file gets a new entry (decoded again)."""

    kind = "disk"

    def __init__(
        self,
        paths: Sequence[str],
        size: Sequence[int],
        decode: Decode,
        root: str | os.PathLike,
        workers: int = 1,
        bad: dict[str, str] | None = None,
    ) -> None:
        """Decode every image without an entry yet; with `bad` (another process of this machine built the entries
        and found these unreadable), decode none."""
        start = time.time()
        self.root = settings.make_dir(root, "--cache_dir", "CACHE_DIR")
        self.paths, self.size, self.decode = list(paths), tuple(size), decode
        self.files = [self.entry(p, size) for p in paths]

        def store(i: int, image: np.ndarray) -> None:
            self.files[i].parent.mkdir(parents=True, exist_ok=True)
            utils.atomic_write(self.files[i], lambda f: np.save(f, image), binary=True)

        reused = sum(f.is_file() for f in self.files)
        if bad is None:
            self.bad = _decode_all(paths, decode, store, workers, skip=lambda i: self.files[i].is_file())
        else:
            self.bad = bad
        total = sum(f.stat().st_size for f in self.files if f.is_file())
        self.report = (
            f"disk cache in {self.root}: {len(paths) - len(self.bad)} images ({reused} reused), "
            f"{total / 2**20:.1f} MiB, ready in {time.time() - start:.1f}s"
        )

    def entry(self, path: str | os.PathLike, size: Sequence[int]) -> Path:
        stat = os.stat(path)
        key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size[0]}x{size[1]}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def kept(self, mask: np.ndarray) -> DiskCache:
        new = copy.copy(self)
        new.files = [f for f, k in zip(self.files, mask, strict=True) if k]
        new.paths = [p for p, k in zip(self.paths, mask, strict=True) if k]
        return new

    def __getitem__(self, index: int) -> np.ndarray:
        """The entry, checked as it is read: a truncated, overwritten or foreign file is decoded again from its
        image and rewritten, with one warning, instead of failing the run at its first batch."""
        file = self.files[index]
        try:
            image = np.load(file, allow_pickle=False)
            if image.dtype == np.uint8 and image.shape == (*self.size, 3):
                return image
            problem = f"holds a {image.dtype} array of shape {image.shape}"
        except (OSError, ValueError, EOFError) as e:  # numpy's errors for a truncated or non-.npy file
            problem = f"cannot be read ({utils.reason(e)})"
        image = self.decode(self.paths[index])
        print(f"warning: disk cache entry {file} (of {self.paths[index]}) {problem}; decoded the image again",
              file=sys.stderr, flush=True)  # fmt: skip
        with contextlib.suppress(OSError, utils.UserError):  # a read-only or full cache still trains
            utils.atomic_write(file, lambda f: np.save(f, image), binary=True)
        return image

    def __len__(self) -> int:
        return len(self.files)


def find_unreadable(paths: Sequence[str], decode: Decode, workers: int = 1) -> dict[str, str]:
    """{path: reason} of every image `decode` fails on, all found in one pass; nothing is kept."""
    return _decode_all(paths, decode, lambda i, image: None, workers)


def build_cache(
    kind: str,
    paths: Sequence[str],
    size: Sequence[int],
    decode: Decode,
    workers: int = 1,
    cache_dir: str | os.PathLike = "cache",
) -> RamCache | DiskCache:
    """The cache of `kind` ('ram' or 'disk') over `paths`; unreadable images are listed in its `.bad`."""
    if kind == "ram":
        return RamCache(paths, size, decode, workers)
    if kind == "disk":
        return DiskCache(paths, size, decode, cache_dir, workers)
    raise utils.UserError(f"--cache {kind} is unknown: choose auto, none, ram or disk")


_reused: dict[tuple, tuple[dict[str, str], RamCache | DiskCache | None]] | None = None  # see reuse_within_process
REUSED_AT_MOST = 2  # decoded sets kept by reuse_within_process: a sweep over --resize alternates between a few


@contextlib.contextmanager
def reuse_within_process() -> Iterator[None]:
    """Within this block, `prepare_images` decodes a set of images once and hands later calls over the same files
    (by path, size and modification time), load size, cache kind and folder the cache it built then (sweep.py:
    the trials of a sweep run one after another in one process)."""
    global _reused
    outer, _reused = _reused, {} if _reused is None else _reused
    try:
        yield
    finally:
        _reused = outer


def reuse_key(paths: Sequence[str], size: Sequence[int], kind: str, cache_dir: str) -> tuple:
    files = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    return files, tuple(size), kind, str(Path(cache_dir).resolve()) if kind == "disk" else None


def decoded_once(
    paths: Sequence[str], decode: Decode, size: Sequence[int], kind: str, workers: int, cache_dir: str
) -> tuple[dict[str, str], RamCache | DiskCache | None]:
    """({path: reason} of the unreadable images, the cache of `kind` or None): built now, or within
    `reuse_within_process` taken from an earlier call over the same images."""
    key = reuse_key(paths, size, kind, cache_dir) if _reused is not None else None
    if key is not None and key in _reused:
        bad, cache = _reused[key]
        print(f"Decoded images reused from the previous run in this process ({len(paths)} images, {kind} cache)")
        return bad, cache
    if kind == "none":
        bad, cache = find_unreadable(paths, decode, workers), None
    else:
        cache = build_cache(kind, paths, size, decode, workers, cache_dir)
        bad = cache.bad
        print(cache.report)
    if key is not None:
        while len(_reused) >= REUSED_AT_MOST:
            _reused.pop(next(iter(_reused)))
        _reused[key] = bad, cache
    return bad, cache


# ---------------------------------------------------------------------------------------------------
# One cache per machine under torchrun: the node's local rank 0 builds it, the other local ranks attach it.
SHARED_DIR = Path("/dev/shm")  # a memory file system: a RAM cache there is one copy for every process that maps it
PREFIX = "baseline-cache-"


def node_ranks() -> tuple[int, int, int]:
    """(local rank, local world size, global rank of this machine's local rank 0) under torchrun, which numbers the
    ranks of one machine consecutively; (0, 1, 0) in one process."""
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return local_rank, local_world, devices.rank() - local_rank


def remove_stale(folder: Path) -> list[Path]:
    """The shared cache files in `folder` whose building process is gone (killed before it removed them: a
    `.partial` one may be half-written, so none is ever attached by a later run); returns them."""
    removed = []
    for file in folder.glob(f"{PREFIX}*-*.*"):
        pid = file.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                file.unlink()
                removed.append(file)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def shared_file(paths: Sequence[str], size: Sequence[int]) -> Path | None:
    """Where this machine's RAM cache of `paths` at `size` is built: named by their content (paths, sizes,
    modification times, load size) and by the building process, in SHARED_DIR; None when SHARED_DIR is missing or
    has too little room (Docker's default /dev/shm is 64 MB), and the caller uses the disk cache."""
    nbytes = len(paths) * size[0] * size[1] * 3
    try:
        stat = os.statvfs(SHARED_DIR)
        room = stat.f_bavail * stat.f_frsize if os.access(SHARED_DIR, os.W_OK) else 0
    except OSError:  # no such folder (not Linux)
        room = 0
    if room < nbytes + 2**26:
        print(
            f"warning: {SHARED_DIR} has no room for the {nbytes / 2**20:.0f} MiB RAM cache the ranks of this machine "
            "would share: the disk cache (--cache_dir) is used instead (docker run --shm-size or --ipc=host gives "
            "it room)",
            file=sys.stderr,
        )
        return None
    remove_stale(SHARED_DIR)
    key = hashlib.sha1(repr(reuse_key(paths, size, "ram", "")).encode()).hexdigest()[:16]
    return SHARED_DIR / f"{PREFIX}{key}-{os.getpid()}.partial"


def build_for_node(
    paths: Sequence[str], decode: Decode, size: Sequence[int], kind: str, workers: int, cache_dir: str
) -> tuple[str, Path | None, dict[str, str], RamCache | DiskCache | None]:
    """Local rank 0's part: (kind, shared file, unreadable images, cache), decoded with the cores of every local
    rank (they wait). A RAM cache is built under a `.partial` name and renamed when complete."""
    _, local_world, _ = node_ranks()
    kind = choose_kind(kind, len(paths), size)  # one copy for the machine: sized against its memory once
    file = shared_file(paths, size) if kind == "ram" else None
    if kind == "ram" and file is None:
        kind = "disk"
    if kind != "ram":
        bad, cache = decoded_once(paths, decode, size, kind, workers * local_world, cache_dir)
        return kind, None, bad, cache
    try:
        cache = RamCache(paths, size, decode, workers * local_world, file)
        ready = file.with_suffix(".ready")
        os.replace(file, ready)
    except OSError as e:  # a /dev/shm filled meanwhile
        file.unlink(missing_ok=True)
        message = f"cannot build the shared RAM cache in {file}: {utils.reason(e)}; pass --cache disk"
        raise utils.UserError(message) from e
    except BaseException:
        file.unlink(missing_ok=True)
        raise
    print(f"{cache.report}, shared by the {local_world} processes of this machine")
    return kind, ready, cache.bad, cache


def decoded_once_per_node(
    paths: Sequence[str], decode: Decode, size: Sequence[int], kind: str, workers: int, cache_dir: str
) -> tuple[dict[str, str], RamCache | DiskCache | None]:
    """`decoded_once` under torchrun: each machine decodes its images once. Its local rank 0 builds the cache (RAM:
    in SHARED_DIR; disk: under `cache_dir`) while the other ranks wait; they then attach it and decode nothing.
    The shared file is removed once every rank has mapped it, so it lives as long as the run."""
    local_rank, _, leader = node_ranks()
    built: tuple | str | None = None
    if local_rank == 0:
        try:
            built = build_for_node(paths, decode, size, kind, workers, cache_dir)
        except utils.UserError as e:
            built = str(e)  # the other ranks end with the same line instead of waiting for the timeout
    found = devices.gather_objects(None if built is None else built[:3] if isinstance(built, tuple) else built)
    if isinstance(found[leader], str):
        raise utils.UserError(found[leader])
    kind, file, bad = found[leader]
    if local_rank == 0:
        cache = built[3]
    elif kind == "ram":
        cache = RamCache.attach(file, len(paths), size, bad)
    elif kind == "disk":
        cache = DiskCache(paths, size, decode, cache_dir, bad=bad)
    else:
        cache = None
    devices.gather_objects(None)  # every rank has mapped the file
    if local_rank == 0 and file is not None:
        file.unlink(missing_ok=True)
    return bad, cache


def prepare_images(
    data: Any, decode: Decode, size: Sequence[int], kind: str, workers: int, cache_dir: str, skip_bad: bool
) -> tuple[dict[str, str], RamCache | DiskCache | None]:
    """Decode every image of `data` once before training (once per machine under torchrun), into the cache of
    `kind` (choose_kind) when there is one: stop with all unreadable images listed, or drop them (`skip_bad`,
    --skip_bad_images). Returns ({path: reason} of dropped images, cache)."""
    paths = [str(p) for p in data.image_paths]
    if devices.world_size() > 1:
        bad, cache = decoded_once_per_node(paths, decode, size, kind, workers, cache_dir)
    else:
        bad, cache = decoded_once(paths, decode, size, choose_kind(kind, len(paths), size), workers, cache_dir)
    if not bad:
        return bad, cache
    listing = utils.listing([f"{p} ({r})" for p, r in bad.items()], limit=10, sep="; ")
    if not skip_bad:
        raise utils.UserError(
            f"{len(bad)} image(s) cannot be read: {listing}. Replace or remove them, or pass --skip_bad_images"
        )
    print(
        f"warning: skipping {len(bad)} unreadable image(s), listed in the run's bad_images.tsv: {listing}",
        file=sys.stderr,
    )
    if cache is not None:
        cache = cache.kept(np.array([p not in bad for p in paths]))
    data.remove(bad)
    return bad, cache
