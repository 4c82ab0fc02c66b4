"""State dicts round-trip exactly, resuming is bit-identical, and bad settings fail with a clear error."""

from __future__ import annotations

import io

import pytest
import torch

from pretrain.optim import RotationalOptimizer
from pretrain.parallel.zero_portable import scalar_device

RULE_HYPER = {"adamw": dict(lr=1e-2, betas=(0.9, 0.95)), "lion": dict(lr=1e-3), "sgdm": dict(lr=0.05)}


def _model(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * 0.1 for shape in ((12, 8), (8, 12), (12,), (5, 4, 3))]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:1], "rotational": True, "neuron_axis": 0},
            {"params": params[1:2], "rotational": True, "neuron_axis": 1},
            {"params": params[2:3], "weight_decay": 0.0},
            {"params": params[3:], "rotational": False}]


def _optimizer(params: list[torch.Tensor], rule: str) -> RotationalOptimizer:
    return RotationalOptimizer(_groups(params), rule=rule, weight_decay=0.1, **RULE_HYPER[rule])


def _step(opt: RotationalOptimizer, params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def _saved(obj: object) -> object:
    """Through torch.save and the safe (weights_only) loader, as checkpoints are."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        assert state.keys() == b["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


@pytest.mark.parametrize("rule", list(RULE_HYPER))
def test_state_dict_round_trips_and_resume_is_bit_identical(rule: str) -> None:
    params = _model()
    opt = _optimizer(params, rule)
    for seed in range(4):
        _step(opt, params, seed)
    saved_weights, saved_state = _saved([p.detach().clone() for p in params]), _saved(opt.state_dict())

    resumed = _model(seed=99)  # a fresh run: build the optimizer, then load weights and state
    resumed_opt = _optimizer(resumed, rule)
    with torch.no_grad():
        for p, w in zip(resumed, saved_weights, strict=True):
            p.copy_(w)
    resumed_opt.load_state_dict(saved_state)
    _assert_states_equal(resumed_opt.state_dict(), opt.state_dict())

    for seed in range(4, 7):
        _step(opt, params, seed)
        _step(resumed_opt, resumed, seed)
        for p, q in zip(params, resumed, strict=True):
            assert torch.equal(p, q)
    _assert_states_equal(resumed_opt.state_dict(), opt.state_dict())


def test_step_counters_advance_together_and_follow_replaced_entries() -> None:
    """A group's counters are views of one tensor (one add a step); an entry replaced from outside is followed."""
    params = _model()
    opt = RotationalOptimizer([{"params": params, "rotational": False}], rule="adamw", lr=1e-2)
    for seed in range(3):
        _step(opt, params, seed)
    steps = [opt.state[p]["step"] for p in params]
    assert [float(s) for s in steps] == [3.0] * 4
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1
    opt.state[params[1]]["step"] = torch.tensor(10.0)  # as DeepSpeed restoring a partition's counter does
    opt.state[params[2]]["step"] = torch.tensor(7.0, dtype=torch.float64)  # a kind that is not packed
    _step(opt, params, 3)
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 11.0, 8.0, 4.0]
    assert opt.state[params[2]]["step"].dtype == torch.float64
    reloaded = _saved(opt.state_dict())
    assert [float(reloaded["state"][i]["step"]) for i in range(4)] == [4.0, 11.0, 8.0, 4.0]


def test_a_live_set_that_alternates_keeps_both_plans_and_counts_like_torch() -> None:
    """A tensor without a gradient on odd steps: two live sets, two cached plans, per-tensor counts as torch's."""
    params = _model()[:3]
    ours = RotationalOptimizer([{"params": params, "rotational": False}], rule="adamw", lr=1e-2)
    ref_params = [p.clone() for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0, foreach=True)
    plans = {}
    for step in range(6):
        for opt, group in ((ours, params), (ref, ref_params)):
            gen = torch.Generator().manual_seed(step)
            for i, p in enumerate(group):
                p.grad = None if i == 1 and step % 2 else torch.randn(p.shape, generator=gen)
            opt.step()
        if step == 1:
            plans = {key: id(plan) for key, plan in ours._plans.items()}
    assert len(plans) == 2 and {key: id(plan) for key, plan in ours._plans.items()} == plans
    assert [float(ours.state[p]["step"]) for p in params] == [float(ref.state[q]["step"]) for q in ref_params]
    assert [float(ours.state[p]["step"]) for p in params] == [6.0, 3.0, 6.0]
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q)


def test_resume_over_loaded_weights_is_bit_identical_too() -> None:
    """Building the optimizer over already trained (centred) weights leaves them untouched."""
    params = _model()
    opt = _optimizer(params, "adamw")
    for seed in range(3):
        _step(opt, params, seed)
    resumed = [p.detach().clone() for p in params]
    resumed_opt = _optimizer(resumed, "adamw")
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(p, q)
    resumed_opt.load_state_dict(_saved(opt.state_dict()))
    _step(opt, params, 3)
    _step(resumed_opt, resumed, 3)
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(p, q)


def test_per_neuron_state_is_one_float_per_neuron() -> None:
    params = _model()
    opt = _optimizer(params, "adamw")
    _step(opt, params, 0)
    assert opt.state[params[0]]["neuron_norm"].shape == (12,)
    assert opt.state[params[1]]["update_norm_avg"].shape == (12,)  # Conv1D-like: neurons along axis 1
    assert "neuron_norm" not in opt.state[params[2]] and "neuron_norm" not in opt.state[params[3]]
    assert opt.state[params[0]]["step"].device.type == "cpu"


@pytest.mark.parametrize("build,message", [
    (lambda p: RotationalOptimizer([{"params": [p], "rotational": True}], weight_decay=0.0), "weight_decay > 0"),
    (lambda p: RotationalOptimizer([p], rule="adam", weight_decay=0.1), "unknown rule"),
    (lambda p: RotationalOptimizer([{"params": [p], "neuron_axis": 2}], weight_decay=0.1), "out of range"),
    (lambda p: RotationalOptimizer([{"params": [p[0]], "rotational": True}], weight_decay=0.1), "neuron axis"),
])
def test_bad_settings_raise_one_clear_error(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(torch.randn(4, 6))


def test_weight_decay_set_to_zero_later_is_refused_at_the_step() -> None:
    p = torch.randn(4, 6)
    opt = RotationalOptimizer([{"params": [p], "rotational": True}], weight_decay=0.1)
    opt.param_groups[0]["weight_decay"] = 0.0
    p.grad = torch.randn(4, 6)
    with pytest.raises(ValueError, match="weight_decay > 0"):
        opt.step()


def test_a_vector_may_rotate_as_a_whole() -> None:
    p = torch.randn(10)
    opt = RotationalOptimizer([{"params": [p], "rotational": True}], weight_decay=0.1, per_neuron=False, lr=1e-2)
    norm = p.norm()
    p.grad = torch.randn(10)
    opt.step()
    torch.testing.assert_close(p.norm(), norm)


def test_a_portable_zero_resume_puts_step_counts_where_each_optimizer_reads_them() -> None:
    """torch's fused (or capturable) AdamW reads its step count on the parameter's device, as its own
    `load_state_dict` places it; torch's other AdamW and ours keep it on the host (reading it never
    syncs). The `meta` tensor stands in for a GPU partition, which this machine may not have."""
    params, partition = [torch.nn.Parameter(torch.zeros(4))], torch.zeros(4, device="meta")
    assert scalar_device(torch.optim.AdamW(params, fused=True), partition) == partition.device
    assert scalar_device(torch.optim.AdamW(params, capturable=True), partition) == partition.device
    assert scalar_device(torch.optim.AdamW(params), partition) == torch.device("cpu")
    assert scalar_device(RotationalOptimizer(params, rule="adamw", lr=1e-3), partition) == torch.device("cpu")
