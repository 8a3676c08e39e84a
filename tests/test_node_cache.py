"""One decoded-image cache per machine under torchrun: local rank 0 builds it, every rank attaches it (cache.py)."""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cache
import devices
import imaging

SIZE = (24, 20)


def make_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


class CountingDecode:
    """imaging.decode_fixed that appends one byte to `counter` per image (O_APPEND: exact across processes), and
    ends its process (like a kill) at image number `die_at`."""

    def __init__(self, counter: Path, die_at: int | None = None) -> None:
        self.counter, self.die_at = counter, die_at

    def __call__(self, path: str) -> np.ndarray:
        fd = os.open(self.counter, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, b".")
        os.close(fd)
        if self.die_at is not None and self.counter.stat().st_size >= self.die_at:
            os._exit(9)
        return imaging.decode_fixed(path, SIZE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank(rank: int, port: int, paths: list[str], kind: str, tmp: Path) -> None:
    """A torchrun process of a 2-rank machine: its view of the cache goes to tmp/rank{rank}.npy."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    devices.init_distributed("cpu", timeout_min=2)
    try:
        decode = CountingDecode(tmp / "decoded")
        bad, store = cache.decoded_once_per_node(paths, decode, SIZE, kind, 2, str(tmp / "disk"))
        pixels = np.stack([store[i] for i in range(len(paths))]) if store is not None else np.zeros(0)
        np.save(tmp / f"rank{rank}.npy", pixels)
        (tmp / f"rank{rank}.kind").write_text(f"{type(store).__name__} {len(bad)} {os.getpid()}")
    finally:
        devices.cleanup_distributed()


def run_two_ranks(paths: list[str], kind: str, tmp: Path) -> list[int]:
    ctx, port = multiprocessing.get_context("fork"), free_port()
    procs = [ctx.Process(target=one_rank, args=(r, port, paths, kind, tmp)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


@pytest.mark.parametrize(("kind", "holder"), [("ram", "RamCache"), ("disk", "DiskCache"), ("none", "NoneType")])
def test_two_ranks_decode_every_image_once_and_see_identical_pixels(tmp_path, kind, holder):
    paths = make_images(tmp_path / "images", 12)
    assert run_two_ranks(paths, kind, tmp_path) == [0, 0]
    assert (tmp_path / "decoded").stat().st_size == len(paths)  # once per image, not once per rank
    kinds = [(tmp_path / f"rank{r}.kind").read_text().split() for r in range(2)]
    assert [k[:2] for k in kinds] == [[holder, "0"]] * 2
    if kind != "none":
        expected = np.stack([imaging.decode_fixed(p, SIZE) for p in paths])
        for r in range(2):
            np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}.npy"), expected)
    leader_pid = kinds[0][2]
    assert not list(cache.SHARED_DIR.glob(f"{cache.PREFIX}*-{leader_pid}.*"))  # removed once both had mapped it


def test_a_build_killed_halfway_leaves_a_file_no_later_run_attaches(tmp_path):
    paths = make_images(tmp_path / "images", 10)
    ctx = multiprocessing.get_context("fork")
    killed = ctx.Process(
        target=cache.build_for_node, args=(paths, CountingDecode(tmp_path / "killed", die_at=5), SIZE, "ram", 1, "c")
    )
    killed.start()
    killed.join(60)
    assert killed.exitcode == 9
    left = list(cache.SHARED_DIR.glob(f"{cache.PREFIX}*-{killed.pid}.*"))
    assert [f.suffix for f in left] == [".partial"]  # never renamed to .ready: not complete

    kind, ready, bad, store = cache.build_for_node(paths, CountingDecode(tmp_path / "again"), SIZE, "ram", 1, "c")
    try:
        assert not left[0].exists()  # the next build removed what the dead process left
        assert kind == "ram" and ready.suffix == ".ready" and ready.name.endswith(f"-{os.getpid()}.ready")
        assert (tmp_path / "again").stat().st_size == len(paths)  # decoded anew, nothing taken from the dead build
        attached = cache.RamCache.attach(ready, len(paths), SIZE, bad)
        expected = np.stack([imaging.decode_fixed(p, SIZE) for p in paths])
        np.testing.assert_array_equal(attached.images, expected)
        np.testing.assert_array_equal(store.images, expected)
    finally:
        ready.unlink()


def test_no_room_in_shared_memory_falls_back_to_the_disk_cache(tmp_path, monkeypatch, capsys):
    paths = make_images(tmp_path / "images", 4)
    monkeypatch.setattr(cache, "SHARED_DIR", tmp_path / "missing")
    kind, file, bad, store = cache.build_for_node(paths, CountingDecode(tmp_path / "n"), SIZE, "ram", 1,
                                                  str(tmp_path / "disk"))  # fmt: skip
    assert (kind, file, bad, type(store).__name__) == ("disk", None, {}, "DiskCache")
    assert "the disk cache (--cache_dir) is used instead" in capsys.readouterr().err
    np.testing.assert_array_equal(store[3], imaging.decode_fixed(paths[3], SIZE))
