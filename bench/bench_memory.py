"""Peak memory of the training loader's processes (main + workers) with the RAM cache, for several worker counts.

    .venv/bin/python bench/bench_memory.py                         # 1400 images; 0, 2 and 4 workers
    .venv/bin/python bench/bench_memory.py --n 7000 --workers 0 1 2 4 8 --seconds 5
    .venv/bin/python bench/bench_memory.py --workers 0 --ranks 1 2 4   # torchrun processes sharing one cache

Each worker count runs in a fresh Python process that builds a RamCache, makes the training loader as engine.fit
does (--augmentation, train.py's loader defaults) and iterates epochs, reading every batch, for at least --epochs
epochs and --seconds seconds. Meanwhile this process, which never imports torch, samples the PSS (proportional set
size: a page shared by k processes counts 1/k to each) of that process and of its workers from
/proc/<pid>/smaps_rollup. Summed PSS counts every page once, so a cache the workers share through fork counts once
whatever their number, while a copied cache would add its size per worker. What does grow per worker is its own
private memory and the batches in flight (up to prefetch_factor batches per worker, in shared memory).

With --ranks R > 1 the child is launched by torchrun as R gloo processes of one machine, each building its cache as
train.py does (cache.prepare_images: local rank 0 decodes, the others attach its shared file), and every process
under torchrun is sampled. `decoded` counts the decode calls of all of them; `copies` is the summed shared-memory
PSS over the cache's size: 1.0 when the ranks hold one copy (with 0 workers no batch is in shared memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 2**20
RESIZE = (128, 96)  # (H, W) network input, train.py's default --resize
START, END = "epochs start", "epochs end"  # what the child prints around its epochs


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """utils.HelpFormatter, repeated here: importing utils would load torch into the sampling process."""


def smaps_rollup(pid: int) -> dict[str, int]:
    """Fields of /proc/<pid>/smaps_rollup in bytes (Pss, Private_Dirty, ...); empty if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    fields = {}
    for line in text.splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields


def child_pids(pid: int) -> list[int]:
    """Every descendant of `pid` (the loader workers): through psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [d for c in found for d in child_pids(c)]


def sample(pid: int) -> dict[str, float]:
    """Summed PSS of `pid` and its descendants, the main process's part, a worker's mean PSS and mean private
    memory (pages no other process maps: where a copied cache would show), and the shared-memory PSS of all."""
    main = smaps_rollup(pid)
    workers = [f for f in (smaps_rollup(p) for p in child_pids(pid)) if f]
    n = max(1, len(workers))
    return {
        "total": main.get("Pss", 0) + sum(f["Pss"] for f in workers),
        "main": main.get("Pss", 0),
        "workers": len(workers),
        "worker_pss": sum(f["Pss"] for f in workers) / n,
        "worker_private": sum(f["Private_Clean"] + f["Private_Dirty"] for f in workers) / n,
        "shmem": main.get("Pss_Shmem", 0) + sum(f["Pss_Shmem"] for f in workers),
    }


def measure(args: argparse.Namespace) -> None:
    """Child mode: build the cache and the loader with --child workers, iterate epochs between the START and END
    lines, then print one JSON line."""
    # Imported here, not at the top: the sampling parent never loads torch, so it shares no library page with
    # the measured processes (which would take part of their PSS out of the measurement).
    import functools
    import warnings

    import numpy as np
    import torch

    import augmentation
    import cache as cache_module
    import dataset as dataset_module
    import devices
    import engine
    import imaging
    import subset as subset_module
    import train
    import utils

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    workers = args.child
    preset = utils.find_class(augmentation, args.augmentation, "--augmentation")
    aug = preset(RESIZE, dataset_module.SEED_MEAN, dataset_module.SEED_STD)
    data = dataset_module.MaskSplitByProfileDataset(args.data_dir)
    decode = functools.partial(imaging.decode_fixed, size=aug.load_size)
    rank, _, _ = devices.init_distributed("cpu")  # under torchrun (--ranks): a gloo group; else one process
    main_rank = rank == 0
    counted = CountedDecode(decode, args.count_file)
    if args.each_rank_decodes:  # the way before one cache per machine: every rank builds its own
        ram = cache_module.RamCache([str(p) for p in data.image_paths], aug.load_size, counted, workers=workers + 1)
    else:  # as train.py builds it
        _, ram = cache_module.prepare_images(data, counted, aug.load_size, "ram", workers + 1, "cache", False)
    flags = ["--num_workers", str(workers), "--batch_size", str(args.batch_size), "--resize", *map(str, RESIZE)]
    train_args = train.get_parser().parse_args(flags)
    loader_part, _ = augmentation.split_for_device(aug.train_transform)  # the hand-over engine.fit makes
    subset = subset_module.ImageSubset(data, np.arange(len(data)), loader_part, aug.load_size, cache=ram)
    sampler = engine.EpochSampler(len(subset), train_args.seed)  # the training loader, as engine.fit makes it
    settings = engine.LoopSettings.from_config(vars(train_args))
    loader = engine.make_loader(subset, args.batch_size, settings, torch.device("cpu"), sampler)

    before = smaps_rollup(os.getpid())["Pss"]  # cache built, no worker started yet
    start, epochs, checksum, sampling = time.perf_counter(), 0, 0.0, False
    while epochs < args.epochs or time.perf_counter() - start < args.seconds:
        sampler.set_epoch(epochs)
        for images, _targets in loader:
            checksum += float(images.float().mean())  # read every batch, as a training step would
            if not sampling:  # the workers are up (a sample taken while they fork could count a page twice)
                devices.gather_objects(None)  # every rank's workers are up
                if main_rank:
                    print(START, flush=True)
                sampling = True
        epochs += 1
    seconds = time.perf_counter() - start
    devices.gather_objects(None)  # every rank is done
    if not main_rank:
        devices.cleanup_distributed()
        return
    print(END, flush=True)
    images = next(iter(loader))[0]
    result = {
        "loader_workers": loader.num_workers,
        "load_size": list(aug.load_size),
        "batch_bytes": images.numel() * images.element_size(),
        "batch_dtype": str(images.dtype).removeprefix("torch."),
        "before": before,
        "cache": ram.images.nbytes,
        "images": len(ram),
        "epoch_s": seconds / epochs,
        "epochs": epochs,
        "prefetch": train_args.prefetch_factor,
        "start_method": torch.multiprocessing.get_start_method(),
        "checksum": checksum,
    }
    print(json.dumps(result), flush=True)
    devices.cleanup_distributed()


class CountedDecode:
    """`decode` that appends a byte to `count_file` per call (O_APPEND: one count across processes)."""

    def __init__(self, decode, count_file: str) -> None:
        self.decode, self.count_file = decode, count_file

    def __call__(self, path):
        fd = os.open(self.count_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, b".")
        os.close(fd)
        return self.decode(path)


def run_child(command: list[str], interval: float) -> dict[str, float]:
    """Run one measuring child; sample its processes every `interval` seconds between its START and END lines.
    Returns its JSON result with the peak sample (by summed PSS) and the number of samples added."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while START not in lines and proc.poll() is None:
        time.sleep(0.01)
    peak, samples = {"total": 0.0}, 0
    while END not in lines and proc.poll() is None:
        now = sample(proc.pid)
        samples += 1
        if now["total"] > peak["total"]:
            peak = now
        time.sleep(interval)
    proc.wait()
    reader.join()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the measuring process failed (exit code {proc.returncode}): {' '.join(command)}")
    if samples == 0:
        raise SystemExit("the epochs ended before the first memory sample: give a larger --seconds or --n")
    return {**json.loads(lines[-1]), **peak, "samples": samples}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--n", type=int, default=1400, help="images to generate, rounded up to persons of 7")
    data.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="worker counts, one process each")
    data.add_argument("--ranks", type=int, nargs="+", default=[1], help="torchrun processes (each with --workers)")
    data.add_argument(
        "--each_rank_decodes",
        action="store_true",
        help="also measure, for every --ranks above 1, the ranks each building a cache of their own (before cache.py "
        "shared one per machine)",
    )
    data.add_argument("--batch_size", type=int, default=64, help="images per batch")
    data.add_argument(
        "--augmentation",
        default="FaceAugmentation",
        help="preset of the training loader (FaceAugmentation, the mask data's default, augments in the workers; "
        "with BaseAugmentation batches are copied out of the cache in the main process, so there are no workers)",
    )
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--epochs", type=int, default=2, help="at least this many epochs while sampling")
    sampling.add_argument("--seconds", type=float, default=3.0, help="and at least this many seconds")
    sampling.add_argument("--interval", type=float, default=0.01, help="seconds between memory samples")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one worker count
    p.add_argument("--data_dir", default=None, help=argparse.SUPPRESS)  # internal: the child's images
    p.add_argument("--count_file", default=None, help=argparse.SUPPRESS)  # internal: where decodes are counted
    return p


def main(args: argparse.Namespace) -> None:
    if args.child is not None:
        measure(args)
        return
    if args.n < 1 or args.batch_size < 1 or args.epochs < 1 or min(args.workers) < 0 or min(args.ranks) < 1:
        raise SystemExit("--n, --batch_size, --epochs and every --ranks must be at least 1, every --workers at least 0")
    if not Path("/proc/self/smaps_rollup").is_file():
        raise SystemExit("this benchmark reads /proc/<pid>/smaps_rollup: it needs Linux 4.14 or later")
    try:
        import psutil  # noqa: F401

        finder = "psutil"
    except ImportError:
        finder = "/proc/<pid>/task/*/children"
    persons = -(-args.n // 7)
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        start = time.perf_counter()
        generate = "import sys, demo; demo.make_demo_data(sys.argv[1], n_train=int(sys.argv[2]), n_eval=0, seed=0)"
        subprocess.run([sys.executable, "-c", generate, str(root), str(persons)], cwd=REPO, check=True)
        print(f"wrote {persons * 7} JPEGs in {time.perf_counter() - start:.1f}s", flush=True)
        results = []
        plans = [(r, False) for r in args.ranks] + [(r, True) for r in args.ranks if r > 1 and args.each_rank_decodes]
        for ranks, each in plans:
            for workers in args.workers:
                count = Path(tmp) / f"decoded-{ranks}-{workers}-{each}"
                torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                command = [sys.executable, *(torchrun if ranks > 1 else [])]
                command += [__file__, "--child", str(workers), "--data_dir", str(root / "train/images")]
                command += ["--batch_size", str(args.batch_size), "--epochs", str(args.epochs)]
                command += ["--seconds", str(args.seconds), "--augmentation", args.augmentation]
                command += ["--count_file", str(count)] + (["--each_rank_decodes"] if each else [])
                result = run_child(command, args.interval)
                results.append((workers, {**result, "ranks": ranks, "decoded": count.stat().st_size, "each": each}))

    first = results[0][1]
    h, w = first["load_size"]
    batch_mib = first["batch_bytes"] / MiB
    print(
        f"{first['images']} images | {args.augmentation} | batch {args.batch_size} ({batch_mib:.1f} MiB of "
        f"{first['batch_dtype']}) | "
        f"start method {first['start_method']} | prefetch {first['prefetch']} | children found with {finder} | "
        f"{os.cpu_count()} CPUs | load average {load_avg:.2f} at start, {os.getloadavg()[0]:.2f} at the end"
    )
    print(f"RAM cache: {first['images']} x {h} x {w} x 3 B = {first['cache'] / MiB:.1f} MiB\n")
    print(
        f"{'workers':>7} {'peak PSS':>9} {'vs 0':>7} {'main':>7} {'per worker':>11} {'private':>8} {'shmem':>6} "
        f"{'in flight':>10} {'before':>7} {'samples':>8} {'epochs':>7} {'epoch s':>8} {'ranks':>6} {'decoded':>8} "
        f"{'copies':>7}"
    )
    base = results[0][1]["total"]
    for workers, r in results:
        in_flight = r["loader_workers"] * r["prefetch"] * batch_mib
        if r["loader_workers"] != workers:
            print(f"--workers {workers}: the loader runs {r['loader_workers']} (batches copied out of the cache)")
        print(
            f"{workers:7d} {r['total'] / MiB:9.1f} {(r['total'] - base) / MiB:+7.1f} {r['main'] / MiB:7.1f} "
            f"{r['worker_pss'] / MiB:11.1f} {r['worker_private'] / MiB:8.1f} {r['shmem'] / MiB:6.1f} {in_flight:10.1f} "
            f"{r['before'] / MiB:7.1f} {r['samples']:8d} {r['epochs']:7d} {r['epoch_s']:8.2f} {r['ranks']:6d} "
            f"{r['decoded']:8d} {r['shmem'] / r['cache']:7.2f}{'  each rank decodes' if r['each'] else ''}"
        )
    print(
        "\nMiB. peak PSS: the largest sum over main + workers among the samples; vs 0: its growth over the first row; "
        "at that sample: main (PSS of the main process), per worker (mean PSS of a worker), private (mean memory "
        "of a worker that no other process maps, batches it is filling included), shmem (shared-memory PSS of all: "
        "the cache and the batches in flight); in flight: the most batch memory the workers can hold (workers x "
        "prefetch x batch); before: the main process once the cache is built. A copied cache would add "
        f"{first['cache'] / MiB:.1f} MiB of private memory to every worker. With ranks > 1, main is torchrun's "
        "launcher and the workers are the ranks and their loader workers; decoded: decode calls of all processes; "
        "copies: shmem over the cache's size."
    )


if __name__ == "__main__":
    main(get_parser().parse_args())
