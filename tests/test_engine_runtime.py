"""The trainer's device path, checked on CPU: no host sync per step, deferred divergence checks,
loader / thread / memory-format settings, torch.compile."""

from __future__ import annotations

import shutil
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from dmlbench.config import TrialConfig
from dmlbench.engine import train
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.runtime import (
    loader_settings,
    model_memory_format,
    pin_memory_for,
    trial_runtime,
    use_channels_last,
)
from dmlbench.engine.trainer import StepLogs, build_trainer
from dmlbench.errors import Diverged
from dmlbench.methods import METHODS, Batch, LossOutput, Method

#: Tensor methods that read a value back to the host (a device sync on CUDA)
SYNCING = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy", "cpu")


class _SyncSpy:
    """Counts host read-backs of tensors, by the file of the code that asked for them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: Counter[str] = Counter()
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name: str, orig: Any) -> Any:
        def spy(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = traceback.extract_stack(limit=2)[0].filename
            self.calls[f"{name} from {caller}"] += 1
            return orig(t, *args, **kwargs)

        return spy

    def count(self, where: tuple[str, ...] = ("",)) -> int:
        return sum(n for k, n in self.calls.items() if any(w in k for w in where))


def _site() -> str:
    """``file:function`` of the innermost dmlbench or PML frame of the current stack."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        at = max(fr.filename.rfind("/dmlbench/"), fr.filename.rfind("/pytorch_metric_learning/"))
        if at >= 0:
            return f"{fr.filename[at + 1:]}:{fr.name}"
    return "?"


class _SiteSpy(_SyncSpy):
    """A :class:`_SyncSpy` that names the dmlbench/PML function asking (not only the file)."""

    def _wrap(self, name: str, orig: Any) -> Any:
        def spy(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls[f"{name} from {_site()}"] += 1
            return orig(t, *args, **kwargs)

        return spy


class _ShapeSpy(TorchDispatchMode):
    """Counts the operators whose output size depends on the data (``nonzero``, boolean-mask
    indexing, ``masked_select``, ``unique``): each is a host sync on CUDA, without any Python
    read-back for :class:`_SyncSpy` to see. Keyed by the dmlbench/PML function that ran them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.name()
        sized = any(w in name for w in ("nonzero", "masked_select", "unique"))
        if name.startswith(("aten::index.", "aten::index_put")) and len(args) > 1:
            sized = any(isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if sized:
            self.calls[f"{name} from {_site()}"] += 1
        return func(*args, **(kwargs or {}))

    def count(self, where: tuple[str, ...] = ("",)) -> int:
        return sum(n for k, n in self.calls.items() if any(w in k for w in where))


class _TensorLogs(Method):
    """A sync-free loss with tensor terms and tensor log_stats; NaN from step ``nan_from`` on."""

    name = "tensor_logs_test"
    nan_from = 0
    raise_after_nan = False

    def __init__(self, cfg: TrialConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        self.calls = 0

    def loss(self, batch: Batch) -> LossOutput:
        self.calls += 1
        emb = self.backbone(batch.images)
        total = emb.pow(2).mean()
        if self.nan_from and self.calls >= self.nan_from:
            if self.raise_after_nan and self.calls > self.nan_from:
                raise RuntimeError("a method that breaks on a NaN model")
            total = total * float("nan")
        return LossOutput(total, {"norm": emb.norm(dim=1).mean().detach(), "const": 2.0})

    def log_stats(self, batch: Batch) -> dict[str, float | Tensor]:
        return {"pixel_mean": batch.images.mean()}


@pytest.fixture
def logs_method() -> Iterator[type[_TensorLogs]]:
    METHODS.register("tensor_logs_test")(_TensorLogs)
    try:
        yield _TensorLogs
    finally:
        _TensorLogs.nan_from, _TensorLogs.raise_after_nan = 0, False
        METHODS._entries.pop("tensor_logs_test")


def _trainer(tiny_cfg: dict[str, Any], **kw: Any) -> Any:
    return build_trainer(TrialConfig.from_dict({**tiny_cfg, "iters_per_epoch": 12, **kw}))


def test_no_host_sync_per_step(tiny_cfg: dict[str, Any], logs_method: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # SGD keeps no step counter (Adam reads its CPU-side counter, which is no device sync on CUDA)
    trainer = _trainer(tiny_cfg, method="tensor_logs_test", optimizer="sgd", sync_every=1000)
    batches = list(trainer.loader)
    trainer.run_steps(batches[:2])  # first-call work (lazy init) out of the count
    spy = _SyncSpy(monkeypatch)
    counts = []
    for n in (3, 12):
        spy.calls.clear()
        logs = trainer.run_steps(batches[:n])
        counts.append(spy.count())
    assert counts[0] == counts[1] <= 2, spy.calls  # one read-back per run of steps, whatever its length
    assert set(logs) == {"loss", "norm", "const", "pixel_mean"} and logs["const"] == 2.0


def test_read_backs_follow_sync_every(tiny_cfg: dict[str, Any], logs_method: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tiny_cfg, method="tensor_logs_test", optimizer="sgd", sync_every=4)
    batches = list(trainer.loader)
    trainer.run_steps(batches[:2])
    spy = _SyncSpy(monkeypatch)
    trainer.run_steps(batches[:12])
    assert spy.count(("numpy",)) == 3  # steps 4, 8, 12


@pytest.mark.parametrize("method", ["proxyanchor", "nivmf", "ccp"])
def test_trainer_adds_no_sync_per_step_to_real_methods(
    tiny_cfg: dict[str, Any], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real methods may read values back inside their own maths (PML's reducer, nivMF's rejection
    sampler); the trainer's own code (engine, data) adds none per step."""
    trainer = _trainer(tiny_cfg, method=method, sync_every=1000)
    batches = list(trainer.loader)
    trainer.run_steps(batches[:2])
    spy = _SyncSpy(monkeypatch)
    counts = []
    for n in (3, 12):
        spy.calls.clear()
        trainer.run_steps(batches[:n])
        counts.append(spy.count(("dmlbench/engine/", "dmlbench/datasets/", "dmlbench/methods/base.py")))
    assert counts[0] == counts[1], spy.calls


def _method_trainer(tiny_cfg: dict[str, Any], method: str) -> tuple[Any, list[Batch]]:
    extra = {"fold": 0} if method == "ccp" else {}  # ccp trains on a fold (its stages need a validation)
    # SGD: Adam reads its step counter with item(), a CPU tensor (no device sync on CUDA)
    trainer = _trainer(tiny_cfg, method=method, optimizer="sgd", sync_every=1000, **extra)
    trainer.start()  # warm starts, queue fill, proxy init
    batches = list(trainer.loader)
    trainer.run_steps(batches[:2])  # first-call work (lazy init) out of the count
    return trainer, batches


#: the only read-backs left in a method's step, per step, and where they are (module:function).
#: DiVA draws its triplets on the CPU with its seeded CPU generator from distance-weighted
#: probabilities computed on the device: the discriminative and the shared task copy them back
#: (the inherent sync) and check them for NaN there (a host-side read, no sync). Margin reads its
#: count of active triplets once: whether it is 0 decides what enters the autograd graph.
_READS_LEFT: dict[str, tuple[int, set[str]]] = {
    "diva": (4, {"cpu from dmlbench/methods/diva/functional.py:_probs_on_host",
                 "__bool__ from dmlbench/methods/diva/functional.py:_check_finite"}),
    "margin": (1, {"__bool__ from dmlbench/methods/baselines.py:compute_loss"}),
}


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_methods_read_nothing_back_per_step(tiny_cfg: dict[str, Any], method: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``item()``/``float()``/``bool()``/``int()``/``tolist()``/``numpy()``/``cpu()`` per training
    step, in the methods' own maths (PML's reducers, nivMF's temperature check and sampler,
    DiVA's counts and logs) as in the trainer: runs of 3 and 12 steps read back as often, except
    for the inherent read-backs of :data:`_READS_LEFT`, which come exactly once per step each."""
    trainer, batches = _method_trainer(tiny_cfg, method)
    spy = _SiteSpy(monkeypatch)
    counts = []
    for n in (3, 12):
        spy.calls.clear()
        trainer.run_steps(batches[:n])
        counts.append(spy.count())
    per_step, sites = _READS_LEFT.get(method, (0, set()))
    assert counts[1] - counts[0] == 9 * per_step, (counts, dict(spy.calls))
    per_step_sites = {k for k, n in spy.calls.items() if n >= 12}  # a run's 1-2 read-backs of its logs are fewer
    assert per_step_sites <= sites, dict(spy.calls)


@pytest.mark.parametrize("method", ["ccp", "nivmf"])
def test_methods_make_no_data_sized_tensors_per_step(tiny_cfg: dict[str, Any], method: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``nonzero``/boolean-mask indexing per step either (a host sync on CUDA that no Python
    read-back shows; PML's ProxyAnchorLoss has one, its count of the batch's classes): nivMF's sampler reads
    back once per rejection round after the first (the last finds nothing left to draw), the
    inherent read: how many candidates to draw next sets the random stream."""
    import dmlbench.methods.nivmf.vmf as vmf

    trainer, batches = _method_trainer(tiny_cfg, method)
    rounds = Counter[str]()
    real = vmf._beta_symmetric

    def counted(*args: Any, **kwargs: Any) -> Tensor:
        rounds["draws"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(vmf, "_beta_symmetric", counted)
    counts, sampler = [], []
    for n in (3, 12):
        rounds.clear()
        with _ShapeSpy() as spy:
            trainer.run_steps(batches[:n])
        # (CPU only: F.one_hot checks its labels with a read-back there, not on CUDA: not counted)
        counts.append(spy.count() - spy.count(("vmf.py",)))
        sampler.append((spy.count(("vmf.py:vmf_draw_noise",)), rounds["draws"]))
    assert counts[0] == counts[1], dict(spy.calls)
    assert all(reads == draws for reads, draws in sampler), (sampler, dict(spy.calls))
    assert method == "nivmf" or sampler == [(0, 0), (0, 0)]


def test_a_hook_divergence_is_read_back_with_the_logs_and_names_its_step(
    tiny_cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nivMF's temperature check (T > 0, finite) runs on the device; a T that left T > 0 is
    reported at the next read-back of the step logs, as the divergence of the step where it did."""
    trainer, batches = _method_trainer(tiny_cfg, "nivmf")  # steps 1-2 done, sync_every=1000
    group = next(g for g in trainer.optimizer.param_groups if g["name"] == "temp")
    group["lr"] = 0.0  # T stays where it is put
    with torch.no_grad():
        trainer.method.temp_raw.fill_(-0.5)
    calls: list[int] = []
    loss = trainer.method.loss
    monkeypatch.setattr(trainer.method, "loss", lambda batch: calls.append(1) or loss(batch))
    with pytest.raises(Diverged) as info:
        trainer.run_steps(batches[:5])
    assert len(calls) == 5  # not raised at the step: found at the read-back after the run
    assert info.value.step == 3 and info.value.terms == {"temp": -0.5}


def test_step_logs_read_checks_back_with_the_logs() -> None:
    ok, bad = torch.tensor(False), torch.tensor(True)
    logs = StepLogs(every=10)
    for step in (1, 2):
        logs.add(step, LossOutput(torch.tensor(float(step)), {"t": torch.tensor(2.0)}), {},
                 [(ok, {"temp": torch.tensor(0.5)})])
    assert logs.means() == {"loss": 1.5, "t": 2.0}  # check columns are no logs
    logs = StepLogs(every=10)
    logs.add(1, LossOutput(torch.tensor(1.0)), {}, [(ok, {"temp": torch.tensor(0.5)})])
    logs.add(2, LossOutput(torch.tensor(1.0)), {}, [(bad, {"temp": torch.tensor(-0.5)})])
    logs.add(3, LossOutput(torch.tensor(float("nan"))), {}, [(bad, {"temp": torch.tensor(-0.7)})])
    with pytest.raises(Diverged) as info:
        logs.flush()
    assert info.value.step == 2 and info.value.terms == {"temp": -0.5}


def test_nan_found_at_a_later_read_back_names_its_step(tiny_cfg: dict[str, Any], logs_method: Any) -> None:
    logs_method.nan_from = 3
    cfg = TrialConfig.from_dict({**tiny_cfg, "method": "tensor_logs_test", "iters_per_epoch": 6, "sync_every": 4})
    with pytest.raises(Diverged) as info:
        train(cfg)
    assert info.value.step == 3 and "norm=" in str(info.value) and "const=2" in str(info.value)


def test_error_after_a_nan_is_reported_as_divergence(tiny_cfg: dict[str, Any], logs_method: Any) -> None:
    logs_method.nan_from, logs_method.raise_after_nan = 2, True
    cfg = TrialConfig.from_dict({**tiny_cfg, "method": "tensor_logs_test", "iters_per_epoch": 6, "sync_every": 50})
    with pytest.raises(Diverged) as info:
        train(cfg)
    assert info.value.step == 2


def test_logs_are_step_means(tiny_cfg: dict[str, Any], logs_method: Any) -> None:
    res = train(TrialConfig.from_dict({**tiny_cfg, "method": "tensor_logs_test", "sync_every": 2, "epochs": 1}))
    epoch = res.history[-1]
    assert epoch["const"] == pytest.approx(2.0) and epoch["loss"] > 0 and 0 < epoch["pixel_mean"] < 1


@pytest.mark.parametrize(
    "cpus, cuda, expected",
    [
        (8, True, {"num_workers": 7, "torch_threads": 1, "pin_memory": True}),
        (4, True, {"num_workers": 3, "torch_threads": 1, "pin_memory": True}),
        (1, True, {"num_workers": 0, "torch_threads": 1, "pin_memory": True}),
        (0.5, True, {"num_workers": 0, "torch_threads": 1, "pin_memory": True}),
        (1, False, {"num_workers": 0, "torch_threads": 1, "pin_memory": False}),
        (3.5, False, {"num_workers": 0, "torch_threads": 3, "pin_memory": False}),
        (8, False, {"num_workers": 2, "torch_threads": 6, "pin_memory": False}),
    ],
)
def test_loader_settings(cpus: float, cuda: bool, expected: dict[str, Any], tiny_cfg: dict[str, Any]) -> None:
    assert loader_settings(cpus, cuda) == expected
    TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor", **expected})  # valid trial keys


def test_loader_settings_refuses_no_cpu() -> None:
    with pytest.raises(ValueError, match="positive"):
        loader_settings(0, cuda=True)


def test_pin_and_channels_last_choices(tiny_cfg: dict[str, Any]) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pin_memory_for(None, cuda) and not pin_memory_for(None, cpu)
    assert pin_memory_for(True, cpu) and not pin_memory_for(False, cuda)
    conv = build_backbone(TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor"}))
    assert use_channels_last(None, cuda, conv) and not use_channels_last(None, cpu, conv)
    assert not use_channels_last(None, cuda, nn.Sequential(nn.Linear(4, 4)))
    assert use_channels_last(True, cpu, conv) and not use_channels_last(False, cuda, conv)


def test_trial_runtime_is_scoped() -> None:
    before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    with trial_runtime(1, torch.device("cuda"), deterministic=False):
        assert torch.get_num_threads() == 1 and torch.backends.cudnn.benchmark
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == before


class _FormatSpy(Method):
    name = "format_spy_test"
    seen: list[bool] = []
    seen_eval: list[bool] = []

    def loss(self, batch: Batch) -> LossOutput:
        _FormatSpy.seen.append(batch.images.is_contiguous(memory_format=torch.channels_last))
        return LossOutput(self.backbone(batch.images).pow(2).mean())

    def embed_for_eval(self, images: Tensor) -> dict[str, Tensor]:
        _FormatSpy.seen_eval.append(images.is_contiguous(memory_format=torch.channels_last))
        return super().embed_for_eval(images)

    def pool_embed(self, images: Tensor) -> Tensor:
        _FormatSpy.seen_eval.append(images.is_contiguous(memory_format=torch.channels_last))
        return super().pool_embed(images)


@pytest.mark.parametrize("channels_last", [True, None])
def test_channels_last_reaches_model_and_batches(tiny_cfg: dict[str, Any], channels_last: bool | None) -> None:
    """Training, evaluation and hook batches go in the model's memory format: channels_last when
    it is on (CUDA conv backbones; forced here on CPU), unchanged by default on CPU."""
    METHODS.register("format_spy_test")(_FormatSpy)
    try:
        _FormatSpy.seen, _FormatSpy.seen_eval = [], []
        trainer = build_trainer(TrialConfig.from_dict(
            {**tiny_cfg, "method": "format_spy_test", "channels_last": channels_last}))
        conv = next(m for m in trainer.method.modules() if isinstance(m, nn.Conv2d))
        on = bool(channels_last)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == on
        assert model_memory_format(trainer.method) == (torch.channels_last if on else torch.preserve_format)
        trainer.run_steps(list(trainer.loader))
        trainer._validate()
        trainer.embed_train_set()
        assert _FormatSpy.seen and all(s == on for s in _FormatSpy.seen)
        assert len(_FormatSpy.seen_eval) >= 2 and all(s == on for s in _FormatSpy.seen_eval)
    finally:
        METHODS._entries.pop("format_spy_test")


def test_hook_batches_are_on_the_device_as_floats(tiny_cfg: dict[str, Any]) -> None:
    trainer = build_trainer(TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor"}))
    batch = next(iter(trainer.ctx.train_loader))
    assert batch.images.dtype == torch.float32 and 0.0 <= float(batch.images.min()) <= float(batch.images.max()) <= 1.0


def test_loader_workers_and_pinning_follow_the_config(tiny_cfg: dict[str, Any]) -> None:
    trainer = build_trainer(TrialConfig.from_dict(
        {**tiny_cfg, "method": "proxyanchor", "num_workers": 1, "pin_memory": False, "torch_threads": 1}))
    assert trainer.loader.num_workers == 1 and trainer.loader.persistent_workers and not trainer.loader.pin_memory
    res = train(TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor", "num_workers": 1, "torch_threads": 1}))
    assert res.epochs_run == 2 and res.steps == 6


def _compile_works() -> str | None:
    """Why torch.compile cannot run here, or None."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "torch.compile on CPU needs a C compiler (cc/gcc) and there is none"
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as err:  # what the inductor backend says when it cannot build here
        return f"torch.compile does not run here ({type(err).__name__}: {str(err)[:120]})"
    return None


@pytest.mark.slow
def test_torch_compile_option_trains_the_tiny_backbone(tiny_cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    compiled: list[nn.Module] = []
    orig = nn.Module.compile

    def spy(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        compiled.append(self)
        orig(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", spy)
    cfg = TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor", "torch_compile": True, "epochs": 1})
    res = train(cfg)
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "Backbone"
    assert res.steps == 3 and 0.0 <= res.metrics["map_at_r"] <= 1.0
    plain = train(cfg.replace(torch_compile=False))
    assert res.history[-1]["loss"] == pytest.approx(plain.history[-1]["loss"], rel=1e-3)


def test_batches_pin_through_their_own_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader(pin_memory=True) pins a custom batch type only via its pin_memory() method."""
    pinned: list[tuple[int, ...]] = []

    def fake_pin(t: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # no CUDA here to really pin
        pinned.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = Batch([torch.zeros(4, 3, 8, 8, dtype=torch.uint8)], torch.arange(4), torch.arange(4))
    out = batch.pin_memory()
    assert isinstance(out, Batch) and pinned == [(4, 3, 8, 8), (4,)]
    moved = out.to("cpu", torch.channels_last)
    assert moved.images.dtype == torch.float32 and moved.images.is_contiguous(memory_format=torch.channels_last)
