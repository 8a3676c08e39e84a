"""Every CUDA path of the project on the GPU at hand, in one command and three tables.

    .venv/bin/python bench/gpu_check.py                                         # parts 1 and 2, synthetic faces
    .venv/bin/python bench/gpu_check.py --recipe ../shared/data/maskdev         # and part 3 on maskdev
    .venv/bin/python bench/gpu_check.py --recipe ../shared/data/maskdev --weights efficientnet_b3.safetensors

1. Throughput. For each path: a fresh model (--model/--backbone at --resize, the README's GPU recipe by default)
   trains --steps steps fed from memory (batches made beforehand, already on the device) and as many fed by the
   training loader (RAM cache, FaceAugmentation in loader workers, pinned memory, engine.make_loader), in
   alternating blocks; images/s of each, loader-fed / from memory, and the peak GPU memory. The paths: fp32, fp16
   with GradScaler, bf16, bf16 + channels_last, + torch.compile, + --gpu_aug (augmentation.BatchAugment on the
   device instead of the workers), and DataParallel over every GPU when more than one is visible. The step is
   the training loop's (predict.autocast, predict.make_scaler, engine.wrap_model).
2. train.py itself, one epoch each: the GPU recipe's flags, the defaults (MultiHeadModel on tf_efficientnet_lite0
   from its installed ImageNet weights, with --gpu_aug), and
   torchrun DistributedDataParallel (NCCL) over the visible GPUs. Exit status, seconds, validation macro F1.
3. With --recipe DATA (a competition-layout folder with eval/truth.csv): bench_recipe.py's pretrained defaults and the
   README's GPU recipe (from --weights when given, else from scratch): train time and eval macro F1.

A row that fails prints its reason and the command exits 1; a path this machine cannot run (fp16 on a CPU,
DataParallel with one GPU) says "skipped". It is sized to finish within 8 minutes on one GPU. With --device cpu
it runs on the CPU (what the tests do, with tiny sizes).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import augmentation  # noqa: E402
import cache as cache_module  # noqa: E402
import dataset as dataset_module  # noqa: E402
import demo  # noqa: E402
import devices  # noqa: E402
import engine  # noqa: E402
import imaging  # noqa: E402
import labels  # noqa: E402
import model as model_module  # noqa: E402
import predict  # noqa: E402
import subset as subset_module  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

# The README's GPU recipe (section "On a GPU: a larger backbone from timm's hub"), without its data path and
# --pretrained: the GPU machine has no network, so its weights come from --weights FILE (part 3) or a random start.
GPU_RECIPE = ["--backbone", "efficientnet_b3", "--resize", "256", "192", "--lr", "1e-3", "--warmup_epochs", "1",
              "--epochs", "10", "--amp", "bf16", "--channels_last", "--gpu_aug"]  # fmt: skip
PATHS = {  # name: (amp, channels_last, compile, gpu_aug, data_parallel)
    "fp32": ("off", False, False, False, False),
    "fp16 + GradScaler": ("fp16", False, False, False, False),
    "bf16": ("bf16", False, False, False, False),
    "bf16 + channels_last": ("bf16", True, False, False, False),
    "bf16 + channels_last + compile": ("bf16", True, True, False, False),
    "bf16 + channels_last + gpu_aug": ("bf16", True, False, True, False),
    "DataParallel, bf16 + gpu_aug": ("bf16", False, False, True, True),
}


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (every path) or cpu (the rows a CPU can run)")
    p.add_argument("--n", type=int, default=2100, help="synthetic face images, rounded up to persons of 7")
    p.add_argument("--batch_size", type=int, default=64, help="images per step (per GPU under DataParallel)")
    p.add_argument("--resize", type=int, nargs=2, default=[256, 192], metavar=("H", "W"), help="network input")
    p.add_argument("--model", default="MultiHeadModel", help="model.py class or timm name")
    p.add_argument("--backbone", default="efficientnet_b3", help="for MultiHeadModel (the GPU recipe's)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per feed and path")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per feed first (compile, cuDNN autotune)")
    p.add_argument("--workers", type=int, default=None, help="loader workers; None: train.py's")
    p.add_argument("--epochs", type=int, default=1, help="epochs of part 2's train.py runs")
    p.add_argument("--persons", type=int, default=60, help="synthetic persons (7 photos each) of part 2's runs")
    p.add_argument("--recipe", default=None, help="part 3: a folder with train/images and eval/ (truth.csv)")
    p.add_argument("--weights", default=None, help="part 3: the GPU recipe's --pretrained_path (local file)")
    p.add_argument("--skip", nargs="*", default=[], choices=("throughput", "train"), help="parts to leave out")
    return p


def step(model, optimizer, scaler, amp, device, channels_last, batch_transform, images, targets) -> None:
    """One optimisation step as loop.train_one_epoch takes it (transfer, device transform, layout, autocast,
    scaled backward, step)."""
    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    if batch_transform is not None:
        images = batch_transform(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with predict.autocast(amp, device):
        outputs = model(images)
        loss = F.cross_entropy(model_module.to_class_logits(outputs.float(), model), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def skipped_because(path: str, device: torch.device) -> str | None:
    amp, _, _, _, data_parallel = PATHS[path]
    try:
        predict.check_amp(amp, device)
    except utils.UserError as e:
        return str(e)
    if data_parallel and (device.type != "cuda" or torch.cuda.device_count() < 2):
        return "needs 2 or more GPUs"
    return None


def throughput(args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict]:
    """Part 1: one row per path."""
    data_root = demo.make_demo_data(tmp / "data", n_train=-(-args.n // 7), n_eval=0, seed=0)
    data = dataset_module.MaskSplitByProfileDataset(data_root / "train/images")
    aug = augmentation.FaceAugmentation(args.resize, dataset_module.SEED_MEAN, dataset_module.SEED_STD)
    decode = functools.partial(imaging.decode_fixed, size=aug.load_size)
    ram = cache_module.RamCache([str(p) for p in data.image_paths], aug.load_size, decode, os.cpu_count() or 1)
    flags = ["--batch_size", str(args.batch_size), "--resize", *map(str, args.resize)]
    flags += [] if args.workers is None else ["--num_workers", str(args.workers)]
    settings = engine.LoopSettings.from_config(vars(train.get_parser().parse_args(flags)))
    everything = np.arange(len(data))
    per_image, normalize = augmentation.split_for_device(aug.train_transform)
    feeds = {
        False: (subset_module.ImageSubset(data, everything, per_image, aug.load_size, cache=ram), normalize),
        True: (
            subset_module.ImageSubset(data, everything, augmentation.to_uint8_tensor, aug.load_size, cache=ram),
            augmentation.BatchAugment(
                args.resize,
                aug.train_transform.transforms[-1].mean,
                aug.train_transform.transforms[-1].std,
                aug.crop_fraction,
            ),  # fmt: skip
        ),
    }
    rows = []
    for path, (amp, channels_last, compiling, gpu_aug, data_parallel) in PATHS.items():
        reason = skipped_because(path, device)
        if reason is not None:
            rows.append({"path": path, "status": f"skipped: {reason}"})
            continue
        subset, batch_transform = feeds[gpu_aug]
        gpus = torch.cuda.device_count() if data_parallel else 1
        sampler = engine.EpochSampler(len(subset), 0)
        loader = engine.make_loader(subset, args.batch_size * gpus, settings, device, sampler)
        try:
            rows.append({"path": path, **measure(args, device, loader, batch_transform, amp, channels_last,
                                                 compiling, data_parallel)})  # fmt: skip
        except Exception as e:  # a failing path is what this check is for: report it and go on
            rows.append({"path": path, "status": f"FAILED: {utils.reason(e, 300)}"})
        print(f"  {path}: {rows[-1].get('status', 'ok')}", flush=True)
    return rows


def measure(args, device, loader, batch_transform, amp, channels_last, compiling, data_parallel) -> dict:
    torch.manual_seed(0)
    net = model_module.build_model(args.model, 18, backbone=args.backbone, **labels.model_kwargs()).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    config = {"device": "cuda" if data_parallel else str(device), "data_parallel": data_parallel,
              "compile": compiling, "amp": amp, "resize": args.resize}  # fmt: skip
    model = engine.wrap_model(net, config, device, world=1).train()
    optimizer, scaler = torch.optim.AdamW(net.parameters(), lr=1e-4), predict.make_scaler(amp, device)
    in_memory = [(x.to(device), y.to(device)) for x, y in itertools.islice(itertools.cycle(loader), 8)]
    batches = {"memory": itertools.cycle(in_memory), "loader": itertools.chain.from_iterable(itertools.repeat(loader))}
    run = functools.partial(step, model, optimizer, scaler, amp, device, channels_last, batch_transform)
    for feed in batches.values():
        for images, targets in itertools.islice(feed, args.warmup):
            run(images, targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, counts = dict.fromkeys(batches, 0.0), dict.fromkeys(batches, 0)
    for block in range(3):  # alternating blocks: a change of load hits both feeds alike
        for name, feed in batches.items():
            synchronize(device)
            start = time.perf_counter()
            for images, targets in itertools.islice(feed, args.steps // 3 + (block < args.steps % 3)):
                run(images, targets)
                counts[name] += len(images)
            synchronize(device)
            seconds[name] += time.perf_counter() - start
    rates = {name: counts[name] / max(seconds[name], 1e-9) for name in batches}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    fell_back = compiling and not hasattr(model, "_orig_mod")  # engine.maybe_compile warned and went eager
    return {"memory": rates["memory"], "loader": rates["loader"], "ratio": rates["loader"] / rates["memory"],
            "peak_mib": peak, "status": "FAILED: torch.compile fell back to eager" if fell_back else "ok"}  # fmt: skip


def run_script(command: list[str], cwd: Path, timeout: int = 900) -> tuple[int, float, str, str]:
    start = time.time()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, time.time() - start, done.stdout, done.stderr


def train_runs(args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict]:
    """Part 2: train.py through its command line, one row per run."""
    root = demo.make_demo_data(tmp / "runs_data", n_train=args.persons, n_eval=0, seed=1)
    common = ["--data_dir", str(root / "train/images"), "--model_dir", str(tmp / "model"), "--epochs", str(args.epochs),
              "--device", str(device)]  # fmt: skip
    recipe = [*GPU_RECIPE[: GPU_RECIPE.index("--epochs")], *GPU_RECIPE[GPU_RECIPE.index("--epochs") + 2 :]]
    recipe[1], recipe[3:5] = args.backbone, map(str, args.resize)  # --backbone B --resize H W (the same by default)
    if device.type != "cuda":  # the flags a CPU cannot use: the rows still run train.py's CPU paths
        recipe = [f for f in recipe if f not in ("--amp", "bf16", "--channels_last")]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    plans = {
        "train.py, the GPU recipe's flags": [sys.executable, str(ROOT / "train.py"), *common, *recipe],
        "train.py, defaults": [sys.executable, str(ROOT / "train.py"), *common],
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(max(gpus, 1))]
    plans[f"torchrun DDP ({'NCCL' if gpus else 'gloo'}) x {max(gpus, 1)}"] = [*torchrun, str(ROOT / "train.py"),
                                                                             *common]  # fmt: skip
    rows = []
    for name, command in plans.items():
        code, seconds, out, err = run_script(command, tmp)
        run_dir = re.search(r"Run directory: (\S+)", out)
        row = {"path": name, "status": "ok" if code == 0 else f"FAILED ({code}): {err.strip()[-300:]}", "s": seconds}
        if code == 0 and run_dir:
            config = pd.read_json(Path(run_dir.group(1)) / "config.json", typ="series")
            log = pd.read_csv(Path(run_dir.group(1)) / "log.csv")
            row.update(f1=float(log["val_f1"].max()), gpu_aug=bool(config.get("gpu_aug")), amp=config["amp"])
        rows.append(row)
        print(f"  {name}: {row['status']}", flush=True)
    return rows


def recipes(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Part 3: bench_recipe.py's lines for the defaults and the GPU recipe on --recipe."""
    lines = []
    weights = ["--pretrained_path", str(Path(args.weights).resolve())] if args.weights else ["--no-pretrained"]
    gpu = [*GPU_RECIPE, *weights]
    for name, flags in (("defaults", []), ("GPU recipe" + ("" if args.weights else ", from scratch"), gpu)):
        command = [sys.executable, str(ROOT / "bench/bench_recipe.py"), "--data", str(Path(args.recipe).resolve()),
                   "--seeds", "1", "--model_dir", str(tmp / name.replace(" ", "_")), "--", *flags]  # fmt: skip
        code, seconds, out, err = run_script(command, tmp, timeout=3600)
        lines.append(f"{name}: " + (out.strip().splitlines()[-1] if code == 0 else f"FAILED ({code}) {err[-300:]}"))
        print(f"  {lines[-1]}", flush=True)
    return lines


def describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({os.cpu_count()} cores)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f"{len(names)} x {names[0]} ({memory:.0f} GiB), CUDA {torch.version.cuda}"


def main(args: argparse.Namespace) -> int:
    try:
        device = devices.select_device(args.device)
    except utils.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{describe(device)} | torch {torch.__version__} | {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" not in args.skip:
            print("part 1, throughput:", flush=True)
            rows = throughput(args, device, Path(tmp))
            print(f"\n{args.model} ({args.backbone}) at {args.resize[0]}x{args.resize[1]}, batch {args.batch_size}, "
                  f"{args.steps} timed steps per feed")  # fmt: skip
            print(f"{'path':<34} {'from memory':>12} {'loader-fed':>11} {'ratio':>6} {'peak MiB':>9}  status")
            for r in rows:
                if r.get("status") == "ok":
                    print(f"{r['path']:<34} {r['memory']:12.1f} {r['loader']:11.1f} {r['ratio']:6.2f} "
                          f"{r['peak_mib']:9.0f}  ok")  # fmt: skip
                else:
                    print(f"{r['path']:<34} {'':>12} {'':>11} {'':>6} {'':>9}  {r['status']}")
                failed |= r["status"].startswith("FAILED")
            print("(images/s; ratio: loader-fed / from memory)\n", flush=True)
        if "train" not in args.skip:
            print("part 2, train.py:", flush=True)
            runs = train_runs(args, device, Path(tmp))
            print(f"\n{'run':<34} {'seconds':>8} {'val F1':>7} {'amp':>5} {'gpu_aug':>8}  status")
            for r in runs:
                f1 = f"{r['f1']:7.3f}" if "f1" in r else " " * 7
                print(f"{r['path']:<34} {r['s']:8.1f} {f1} {r.get('amp', ''):>5} {str(r.get('gpu_aug', '')):>8}  "
                      f"{r['status']}")  # fmt: skip
                failed |= r["status"].startswith("FAILED")
            print(flush=True)
        if args.recipe:
            print("part 3, recipes on", args.recipe)
            lines = recipes(args, Path(tmp))
            failed |= any("FAILED" in line for line in lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_parser().parse_args()))
