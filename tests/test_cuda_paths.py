"""The CUDA paths that need a GPU to run, reached on the CPU through a mocked device list: which GPUs a
--device means, LOCAL_RANK binding, the bf16 check, and resuming with fewer GPUs."""

from __future__ import annotations

import pytest
import torch

import devices
import engine
import loop
import predict
import utils


@pytest.fixture()
def two_gpus(monkeypatch):
    """torch believes two GPUs are visible (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    wrapped = []

    class FakeDataParallel(torch.nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module, self.device_ids = module, device_ids
            wrapped.append(self)

    monkeypatch.setattr(torch.nn, "DataParallel", FakeDataParallel)
    return wrapped


@pytest.mark.parametrize(
    ("flag", "data_parallel"), [("auto", True), ("cuda", True), ("cuda:0", False), ("cuda:1", False)]
)
def test_a_device_with_an_index_means_that_one_gpu(two_gpus, flag, data_parallel):
    device = devices.select_device(flag)
    config = {"device": flag, "compile": False, "resize": [8, 8], "data_parallel": True}
    net = engine.wrap_model(torch.nn.Linear(2, 2), config, device, world=1)
    assert isinstance(net, torch.nn.DataParallel) == data_parallel
    assert len(two_gpus) == int(data_parallel)


def run_in_new_thread(module, x):
    """What DataParallel's parallel_apply does with each replica: its forward in a thread of its own, where the
    caller's autocast (thread-local) is not in force."""
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(module(x)))
    thread.start()
    thread.join()
    return out[0]


def test_dataparallel_replicas_keep_the_runs_bf16(two_gpus):
    config = {"device": "cuda", "compile": False, "resize": [8, 8], "data_parallel": True, "amp": "bf16"}
    net = engine.wrap_model(torch.nn.Linear(4, 4), config, torch.device("cuda"), world=1)
    replica = net.module
    assert isinstance(replica, predict.AutocastReplica) and replica.amp == "bf16" and replica.device_type == "cuda"
    assert utils.unwrap_model(net) is replica.module  # checkpoints, EMA and class_logits see the bare model
    # The mechanism, on the CPU's autocast: a bare replica in a new thread loses the dtype; the wrapper keeps it.
    x, linear = torch.rand(2, 4), torch.nn.Linear(4, 4)
    with predict.autocast("bf16", torch.device("cpu")):
        assert linear(x).dtype == torch.bfloat16
        assert run_in_new_thread(linear, x).dtype == torch.float32
        wrapped = predict.AutocastReplica(linear, "bf16", torch.device("cpu"))
        assert run_in_new_thread(wrapped, x).dtype == torch.bfloat16


def test_compile_with_dataparallel_declines_with_one_warning(two_gpus, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(m) or m)
    config = {"device": "auto", "compile": True, "resize": [8, 8], "data_parallel": True, "amp": "off"}
    net = engine.wrap_model(torch.nn.Linear(2, 2), config, torch.device("cuda"), world=1)
    assert isinstance(net, torch.nn.DataParallel) and not compiled
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile with DataParallel over 2 GPUs is not supported" in err[0]
    assert "torchrun" in err[0]
    # One GPU (cuda:1): compile still runs.
    engine.wrap_model(torch.nn.Linear(2, 2), {**config, "device": "cuda:1"}, torch.device("cuda:1"), world=1)
    assert len(compiled) == 1


def test_a_gpu_index_out_of_range_is_one_line(two_gpus):
    with pytest.raises(utils.UserError, match=r"--device cuda:2: only 2 GPU\(s\) are visible \(cuda:0 .. cuda:1\)"):
        devices.select_device("cuda:2")


@pytest.mark.parametrize(("local_rank", "visible", "index"), [(0, 2, 0), (1, 2, 1), (3, 1, 0), (5, 4, 1)])
def test_local_rank_binds_modulo_the_visible_gpus(monkeypatch, local_rank, visible, index):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # no process group is started
    rank, world, device = devices.init_distributed("auto")
    assert (rank, world, device) == (local_rank, 8, torch.device("cuda", index)) and bound == [device]


@pytest.mark.parametrize(("native", "emulated", "accepted"), [(True, True, True), (False, True, False)])
def test_bf16_is_checked_without_emulation_on_the_chosen_gpu(monkeypatch, native, emulated, accepted):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    device = torch.device("cuda", 1)
    if accepted:
        predict.check_amp("bf16", device)
    else:
        with pytest.raises(utils.UserError, match=r"--amp bf16: Tesla T4 \(cuda:1\) has no native bfloat16"):
            predict.check_amp("bf16", device)
    assert calls == [False]


def test_resume_with_fewer_gpus_restores_what_it_can_and_says_so(monkeypatch, capsys):
    state = devices.rng_state()
    expected = torch.rand(3)  # what the CPU generator draws next from `state`
    state["cuda"] = [torch.zeros(8, dtype=torch.uint8)] * 4  # the run had 4 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, index: restored.append(index))
    torch.manual_seed(123)
    devices.set_rng_state(state)
    assert restored == [0, 1]  # no index past the GPUs present
    assert torch.equal(torch.rand(3), expected)
    assert "saved the random state of 4 GPU(s) and 2 are visible now" in capsys.readouterr().err


def test_an_enabled_scaler_resuming_from_a_run_without_one_starts_fresh_with_one_line(capsys):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    import schedule

    off = engine.RunState(model, optimizer, schedule.Schedule(optimizer, "none", 1, 1), {},
                          scaler=torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
    saved = off.state_dict()
    on = engine.RunState(model, optimizer, schedule.Schedule(optimizer, "none", 1, 1), {},
                         scaler=torch.amp.GradScaler("cpu", enabled=True))  # fmt: skip
    on.load_state_dict(saved)
    assert "GradScaler starts fresh" in capsys.readouterr().err
    assert on.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_a_rank_with_nothing_to_validate_contributes_an_empty_part(monkeypatch):
    """8 ranks, 7 validation images: rank 7's share is empty; every rank still gets all 7 in order."""
    world, n, classes = 8, 7, 3
    logits = torch.randn(n, classes)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    items = [(torch.full((3, 2, 2), float(i)), i) for i in range(n)]
    parts = []
    for rank in range(world):
        share = predict.rank_share(items, rank, world)
        loader = torch.utils.data.DataLoader(share, batch_size=2)
        parts.append(predict.evaluate(Fixed(), loader, torch.device("cpu")))
    assert parts[7].outputs.shape[0] == 0
    for name in ("outputs", "probs"):
        gathered = [getattr(p, name) for p in parts]
        monkeypatch.setattr(devices, "gather_objects", lambda part, g=gathered: g)
        full = predict.gather_in_order(gathered[0])
        expected = logits if name == "outputs" else torch.softmax(logits, 1)
        torch.testing.assert_close(full, expected)


def test_gradient_accumulation_under_ddp_all_reduces_once_per_optimizer_step(tmp_path):
    """4 micro-batches at --grad_accum 2 under DistributedDataParallel (a one-rank gloo group): 2 gradient
    all-reduces, not 4, and the same weights as without DDP."""
    import torch.distributed as dist

    import schedule

    x, y = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def train_once(ddp: bool) -> tuple[torch.Tensor, int]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
        calls = []
        net = model
        if ddp:
            net = torch.nn.parallel.DistributedDataParallel(model)

            def counting(state, bucket):
                calls.append(1)
                return _allreduce(bucket)

            net.register_comm_hook(None, counting)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        state = engine.RunState(model, optimizer, schedule.Schedule(optimizer, "none", epochs=1, steps_per_epoch=1))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
        state.new_progress(1)["steps"] = len(loader)
        settings = engine.LoopSettings(grad_accum=2)
        engine.train_one_epoch(net, loader, torch.nn.CrossEntropyLoss(), state, settings, torch.device("cpu"), 3)
        return model[1].weight.detach().clone(), len(calls)

    def _allreduce(bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(None, bucket)

    plain, _ = train_once(ddp=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped, all_reduces = train_once(ddp=True)
    finally:
        dist.destroy_process_group()
    assert all_reduces == 2
    torch.testing.assert_close(wrapped, plain)


def test_ranks_draw_different_augmentations_but_share_the_sampler_order(monkeypatch):
    import augmentation

    images = torch.rand(4, 3, 16, 16)
    draws, orders = {}, {}
    for rank in (0, 1):
        devices.seed_everything(42)  # what every rank does first: the same seed
        devices.seed_for_rank(rank)
        first = torch.rand(8)
        mixed = augmentation.mix_batch(images, torch.tensor([0, 1, 2, 0]), 3, 0.4, 0.0, "box", 1.0)[0]
        draws[rank] = (first, mixed)
        orders[rank] = engine.EpochSampler(10, seed=42, rank=rank, world_size=2).order()
        monkeypatch.setattr(devices, "rank", lambda r=rank: r)
        loader = engine.make_loader(images, 2, engine.LoopSettings(seed=42, num_workers=0), torch.device("cpu"))
        draws[rank] += (loader.generator.initial_seed(),)
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][1], draws[1][1])
    assert draws[0][2] != draws[1][2]  # loader workers seeded apart too
    full = engine.EpochSampler(10, seed=42).order()
    assert sorted(orders[0] + orders[1]) == sorted(full) and orders[0] == full[0::2]  # one permutation, split
    devices.seed_everything(42)
    devices.seed_for_rank(1)
    assert torch.equal(torch.rand(8), draws[1][0])  # a rank's own draws are repeatable


def _train_rank_with_a_nan(rank: int, store: str, results) -> None:
    """One of two gloo ranks: 4 steps of DDP training, where rank 1's last batch holds a NaN image."""
    import datetime

    import torch.distributed as dist

    import schedule

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        net = torch.nn.parallel.DistributedDataParallel(model)
        x, y = torch.randn(8, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        if rank == 1:
            x[6] = float("nan")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = engine.RunState(model, optimizer, schedule.Schedule(optimizer, "none", epochs=1, steps_per_epoch=4))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
        state.new_progress(1)["steps"] = len(loader)
        try:
            engine.train_one_epoch(net, loader, torch.nn.CrossEntropyLoss(), state, engine.LoopSettings(),
                                   torch.device("cpu"), 3)  # fmt: skip
            results.put((rank, "finished"))
        except utils.UserError as e:
            results.put((rank, f"UserError: {e}"))
        except Exception as e:  # noqa: BLE001 (a rank left waiting times out here)
            results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_train_rank_with_a_nan, args=(r, str(tmp_path / "store"), results)) for r in (0, 1)]
    for p in ranks:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in ranks)
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got[1] == "UserError: the loss became nan at epoch 1: lower --lr, or use --clip_grad 1"
    assert (
        got[0] == "UserError: the loss became inf or nan on another rank at epoch 1: lower --lr, or use --clip_grad 1"
    )


def test_the_loss_is_read_on_the_host_once_per_interval_with_the_same_metrics(monkeypatch):
    import schedule

    def run(interval: int) -> tuple[dict, int]:
        monkeypatch.setattr(loop, "HOST_SYNC_STEPS", interval)
        flushes = []
        flush = loop.Tally.flush
        monkeypatch.setattr(loop.Tally, "flush", lambda self, *a: flushes.append(1) or flush(self, *a))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = engine.RunState(model, optimizer, schedule.Schedule(optimizer, "none", epochs=1, steps_per_epoch=9))
        data = torch.utils.data.TensorDataset(torch.randn(18, 3, 2, 2), torch.arange(18) % 3)
        loader = torch.utils.data.DataLoader(data, batch_size=2)
        state.new_progress(1)["steps"] = len(loader)
        engine.train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), state, engine.LoopSettings(grad_accum=2),
                               torch.device("cpu"), 3)  # fmt: skip
        return state.progress, len(flushes)

    every_step, reads_every_step = run(1)  # at --grad_accum 2, reads only at optimizer steps: 2, 4, 6, 8 and 9
    batched, reads = run(4)  # a read every 4 steps (a multiple of 2), and at the epoch's end: 4, 8 and 9
    assert (reads_every_step, reads) == (5, 3)
    assert batched["loss_sum"] == pytest.approx(every_step["loss_sum"], rel=1e-6)
    assert torch.equal(torch.cat(batched["preds"]), torch.cat(every_step["preds"]))
    assert torch.equal(torch.cat(batched["targets"]), torch.arange(18) % 3)


def test_an_interrupted_ddp_epoch_saves_every_ranks_share_and_a_resume_counts_each_once(monkeypatch):
    import types

    shares = [(1.5, [torch.tensor([0, 1])], [torch.tensor([0, 2])]), (2.5, [torch.tensor([2])], [torch.tensor([1])])]
    monkeypatch.setattr(devices, "gather_objects", lambda part: shares)
    progress = {"epoch": 3, "step": 2, "loss_sum": 1.5, "preds": shares[0][1], "targets": shares[0][2], "time_s": 1.0}
    trainer = types.SimpleNamespace(state=types.SimpleNamespace(progress=progress), main_rank=True)
    engine.Trainer.gather_progress(trainer)
    assert progress["loss_sum"] == 4.0
    assert torch.equal(torch.cat(progress["targets"]), torch.tensor([0, 2, 1]))  # what last.pth saves
    for rank, expected in ((0, 3), (1, 0)):
        state = engine.RunState(None, None, None, progress={**progress, "preds": list(progress["preds"])})
        state.keep_own_progress(rank)
        assert sum(len(t) for t in state.progress["preds"]) == expected and state.progress["step"] == 2
        assert state.progress["loss_sum"] == (4.0 if rank == 0 else 0.0)


def test_only_rank_0_makes_fold_folders_and_reads_checkpoints(monkeypatch, tmp_path):
    import train

    monkeypatch.setattr(devices, "rank", lambda: 1)
    sent = {"finished": False, "config": {"resumed": []}}
    monkeypatch.setattr(devices, "broadcast_object", lambda value: sent)  # what rank 0 read
    fitted = []
    monkeypatch.setattr(engine, "fit", lambda config, *a, **k: fitted.append((config["run_dir"], a[7])) or {})
    run_dir = tmp_path / "not-on-this-machine" / "exp"  # rank 0's folder: no shared file system
    config = {"fold": "all", "n_splits": 2}
    train.train_folds(config, None, None, None, run_dir, {}, 2, torch.device("cpu"))
    assert [f[0] for f in fitted] == [str(run_dir / "fold0"), str(run_dir / "fold1")]
    assert all(f[1] is sent for f in fitted) and not (tmp_path / "not-on-this-machine").exists()


def test_device_constants_are_copied_once_and_pickled_without_copies():
    import pickle

    import augmentation

    constant = augmentation.DeviceConstant([1.0, 2.0, 3.0], (1, 3, 1, 1))
    assert constant.to(torch.device("cpu")) is constant.to(torch.device("cpu"))
    assert constant.copies and not pickle.loads(pickle.dumps(constant)).copies


def test_prediction_runs_in_inference_mode_with_the_requested_layout():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.is_inference_mode_enabled(), x.is_contiguous(memory_format=torch.channels_last)))
            return x.mean((2, 3))

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 4, 4), torch.zeros(4)), 2)
    for channels_last in (False, True):
        seen.clear()
        predict.evaluate(Recorder(), loader, torch.device("cpu"), channels_last=channels_last)
        assert seen == [(True, channels_last)] * 2


@pytest.mark.parametrize(
    ("flag", "run_amp", "device", "native", "expected"),
    [
        ("run", "bf16", "cuda", True, "bf16"),
        ("run", "bf16", "cuda", False, "fp16"),  # T4, V100: no native bfloat16
        ("run", "fp16", "cuda", True, "fp16"),
        ("run", "bf16", "cpu", True, "off"),
        ("bf16", "off", "cpu", True, "bf16"),
        ("off", "fp16", "cuda", True, "off"),
    ],
)
def test_inference_predicts_in_the_runs_precision_where_the_device_has_it(
    monkeypatch, flag, run_amp, device, native, expected
):
    import inference

    monkeypatch.setattr(predict, "bf16_native", lambda d: native)
    assert inference.member_amp(flag, {"amp": run_amp}, torch.device(device)) == expected


def test_deterministic_sets_cudnn_and_the_deterministic_algorithms(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.set_deterministic(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert devices.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        devices.set_deterministic(False)
    assert not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
