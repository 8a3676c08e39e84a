"""The CUDA paths that need a GPU to run, reached on the CPU through a mocked device list: which GPUs a
--device means, LOCAL_RANK binding, the bf16 check, and resuming with fewer GPUs."""

from __future__ import annotations

import pytest
import torch

import devices
import engine
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
