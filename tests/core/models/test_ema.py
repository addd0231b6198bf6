import math

import pytest
import torch
from torch import nn

from noether.core.models.ema import ModuleEma

FACTORS = (0.9, 0.99)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def mlp_with_batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class TiedMlp(nn.Module):
    """Two layers share one weight, which state_dict lists under both names."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.tied = nn.Linear(8, 8)
        self.tied.weight = self.shared.weight
        self.last = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.tied(self.shared(self.first(x).relu()).relu()).relu())


class MixedDtypeMlp(nn.Module):
    """Float32 and float64 parameters, so the EMA holds tensors of two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 16)
        self.second = nn.Linear(16, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).relu().double()).float()


def make(architecture) -> nn.Module:
    torch.manual_seed(0)
    return architecture()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(32, 4, generator=generator)
    target = torch.randn(32, 3, generator=generator)
    loss = nn.functional.mse_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def reference_update(reference: dict[str, torch.Tensor], model: nn.Module, factor: float) -> None:
    """The recurrence written out per entry: parameters averaged, everything else copied."""
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, live in model.state_dict().items():
        if name in parameter_names:
            reference[name] = factor * reference[name] + (1 - factor) * live
        else:
            reference[name] = live.clone()


def train_with_ema(architecture, steps: int = 5):
    """Real AdamW steps; returns the model, its EMA and per-factor reference state dicts."""
    model = make(architecture)
    model.train()
    ema = ModuleEma(model, FACTORS)
    reference = {f: {k: v.clone() for k, v in model.state_dict().items()} for f in FACTORS}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        train_step(model, optimizer, step)
        ema.update()
        for factor in FACTORS:
            reference_update(reference[factor], model, factor)
    return model, ema, reference


def inputs() -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(99))


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


ARCHITECTURES = [mlp, mlp_with_batchnorm, TiedMlp, MixedDtypeMlp]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_update_follows_recurrence(architecture):
    model, ema, reference = train_with_ema(architecture)
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for factor in FACTORS:
        state = ema.state_dict(factor)
        assert list(state) == list(model.state_dict())
        for name, expected in reference[factor].items():
            assert state[name].dtype == expected.dtype, name
            if name in parameter_names:
                torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)
                # After 5 steps the average must still lag behind the live weights.
                assert not torch.allclose(state[name], model.state_dict()[name], rtol=0, atol=1e-4), name
            else:
                assert torch.equal(state[name], expected), name


def test_buffers_are_copied_not_averaged():
    model, ema, _ = train_with_ema(mlp_with_batchnorm)
    live = model.state_dict()
    for factor in FACTORS:
        state = ema.state_dict(factor)
        for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(state[name], live[name]), name
    assert live["1.num_batches_tracked"].item() == 5


def test_tied_weights_share_one_average():
    model, ema, _ = train_with_ema(TiedMlp)
    for factor in FACTORS:
        state = ema.state_dict(factor)
        assert state["shared.weight"] is state["tied.weight"]


def test_update_with_factor_zero_tracks_live_exactly():
    model = make(mlp)
    ema = ModuleEma(model, [0.0])
    train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 0)
    ema.update()
    assert_states_equal(ema.state_dict(0.0), model.state_dict())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_state_dict_loads_into_fresh_model(architecture):
    model, ema, reference = train_with_ema(architecture)
    for factor in FACTORS:
        fresh = make(architecture)
        fresh.load_state_dict(ema.state_dict(factor))
        expected_model = make(architecture)
        expected_model.load_state_dict(reference[factor])
        fresh.eval()
        expected_model.eval()
        x = inputs()
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), expected_model(x), rtol=0, atol=1e-5)


def test_load_state_dict_roundtrip_in_place():
    model, ema, _ = train_with_ema(mlp_with_batchnorm)
    source = clone_state(ema.state_dict(0.99))
    pointers = {k: v.data_ptr() for k, v in ema.state_dict(0.9).items()}
    ema.load_state_dict(0.9, source)
    assert_states_equal(ema.state_dict(0.9), source)
    assert {k: v.data_ptr() for k, v in ema.state_dict(0.9).items()} == pointers


def test_reset_from_module():
    model, ema, _ = train_with_ema(mlp_with_batchnorm)
    ema.reset_from_module()
    for factor in FACTORS:
        assert_states_equal(ema.state_dict(factor), model.state_dict())


def test_update_allocates_nothing():
    model = make(mlp_with_batchnorm)
    ema = ModuleEma(model, FACTORS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pointers = {f: {k: v.data_ptr() for k, v in ema.state_dict(f).items()} for f in FACTORS}
    live_pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    for step in range(3):
        train_step(model, optimizer, step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            ema.update()
        assert [e.name for e in prof.events() if e.cpu_memory_usage > 0] == []
    for factor in FACTORS:
        assert {k: v.data_ptr() for k, v in ema.state_dict(factor).items()} == pointers[factor]
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == live_pointers


def test_swapped_in_uses_ema_and_restores_live_exactly():
    model, ema, _ = train_with_ema(mlp_with_batchnorm)
    live_before = clone_state(model.state_dict())
    live_pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    x = inputs()
    for factor in FACTORS:
        ema_before = clone_state(ema.state_dict(factor))
        expected_model = make(mlp_with_batchnorm)
        expected_model.load_state_dict(ema_before)
        expected_model.eval()
        model.eval()
        with ema.swapped_in(factor) as swapped:
            assert swapped is model
            with torch.no_grad():
                assert torch.equal(model(x), expected_model(x))
            # Whatever the body does to the module must neither leak into the EMA nor survive the exit.
            model.train()
            model(x)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        assert_states_equal(model.state_dict(), live_before)
        assert_states_equal(ema.state_dict(factor), ema_before)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == live_pointers


def test_swapped_in_restores_when_body_raises():
    model, ema, _ = train_with_ema(mlp)
    live_before = clone_state(model.state_dict())
    ema_before = clone_state(ema.state_dict(0.9))
    with pytest.raises(KeyError, match="boom"):
        with ema.swapped_in(0.9):
            with torch.no_grad():
                next(model.parameters()).zero_()
            raise KeyError("boom")
    assert_states_equal(model.state_dict(), live_before)
    assert_states_equal(ema.state_dict(0.9), ema_before)
    # The EMA is usable again afterwards.
    with ema.swapped_in(0.99):
        pass
    assert_states_equal(model.state_dict(), live_before)


def test_swapped_in_counts_copies_and_reuses_scratch():
    model, ema, _ = train_with_ema(mlp_with_batchnorm)
    assert ema.copy_count == 0
    with ema.swapped_in(0.9):
        pass
    assert ema.copy_count == 1
    ema.update()
    assert ema.copy_count == 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with ema.swapped_in(0.99):
            pass
    assert [e.name for e in prof.events() if e.cpu_memory_usage > 0] == []
    assert ema.copy_count == 2


def test_swapped_in_cannot_nest():
    model, ema, _ = train_with_ema(mlp)
    live_before = clone_state(model.state_dict())
    with ema.swapped_in(0.9):
        with pytest.raises(RuntimeError, match="nested"):
            with ema.swapped_in(0.99):
                pass
    assert_states_equal(model.state_dict(), live_before)
    assert ema.copy_count == 1


@pytest.mark.parametrize("factor", [1.0, -0.1, 1.5, math.nan])
def test_invalid_factor(factor):
    with pytest.raises(ValueError, match=f"got {factor!r}"):
        ModuleEma(mlp(), [0.9, factor])


def test_duplicate_and_missing_factors():
    with pytest.raises(ValueError, match="duplicate"):
        ModuleEma(mlp(), [0.9, 0.99, 0.9])
    with pytest.raises(ValueError, match="at least one"):
        ModuleEma(mlp(), [])


def test_unknown_factor():
    ema = ModuleEma(mlp(), FACTORS)
    with pytest.raises(ValueError, match="no EMA with factor 0.5"):
        ema.state_dict(0.5)
    with pytest.raises(ValueError, match="no EMA with factor 0.5"):
        ema.load_state_dict(0.5, ema.state_dict(0.9))
    with pytest.raises(ValueError, match="no EMA with factor 0.5"):
        with ema.swapped_in(0.5):
            pass
    assert ema.copy_count == 0


def test_strict_load_errors_leave_ema_untouched():
    model, ema, _ = train_with_ema(mlp_with_batchnorm)
    before = clone_state(ema.state_dict(0.9))

    state = clone_state(before)
    del state["0.bias"]
    del state["1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['0.bias', '1.running_var'\], unexpected keys \['extra.weight'\]"):
        ema.load_state_dict(0.9, state)

    state = {k: torch.zeros_like(v) for k, v in before.items()}
    state["3.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"mismatched shapes: \['3.weight: \(1,\) vs \(3, 16\)'\]"):
        ema.load_state_dict(0.9, state)

    assert_states_equal(ema.state_dict(0.9), before)
