"""The tracker in a real training step: any torch optimizer implementation, checked against an
independent computation from weights saved around the step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pretrain.config import OptimConfig
from pretrain.metrics import LAYER_METRICS, RotationTracker
from pretrain.metrics.sources import OptimizerSource
from pretrain.params import classify_parameters


def tiny_llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=128, tie_word_embeddings=False))


def tiny_gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0,
                                      eos_token_id=0))


def neuron_rows(t: torch.Tensor, axis: int) -> np.ndarray:
    return t.detach().double().movedim(axis, 0).flatten(1).cpu().numpy().copy()


def kahan_angle(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """Row-wise angle 2 atan2(|u0 - u1|, |u0 + u1|) of the unit vectors, in float64: accurate for
    any angle, and a different route than the tracker's. (arccos of the cosine is not: embedding
    rows of tokens missing from the batch only decay, and fp32 rounding of that scaling leaves
    angles of ~2e-8 rad, where arccos(1 - 2e-16) is all rounding.)"""
    u0 = w0 / np.linalg.norm(w0, axis=1, keepdims=True)
    u1 = w1 / np.linalg.norm(w1, axis=1, keepdims=True)
    return 2 * np.arctan2(np.linalg.norm(u0 - u1, axis=1), np.linalg.norm(u0 + u1, axis=1))


@pytest.fixture(params=["per-tensor", "batched", "batched-rejected"])
def path(request, monkeypatch) -> tuple[bool, str]:
    """(batched, device): measure tensor by tensor on CPU, or through fused_sums.Batch (one Triton
    launch per shape) on CUDA, or on CPU in Triton's interpreter (tests/conftest.py) without a GPU.
    `batched-rejected`: the device's compiler rejects the batched kernels, so the tensors are
    measured one at a time after all (with a notice)."""
    if request.param == "per-tensor":
        monkeypatch.setattr("pretrain.metrics.sources._fused_sums", lambda: None)
        return False, "cpu"
    fused_sums = pytest.importorskip("pretrain.metrics.fused_sums", reason="Triton is a dev dependency")
    if request.param == "batched-rejected":  # warmup (compile only) raises, as Triton's does on a failed pass
        class Rejecting:
            def __getitem__(self, grid):
                raise AssertionError("a kernel the compiler rejected was launched")

            def warmup(self, *args, **kwargs):
                raise RuntimeError("PassManager::run failed")

        for name in ("_capture_kernel", "_delta_kernel", "_delta_sums_kernel"):  # the per-tensor one too
            monkeypatch.setattr(fused_sums, name, Rejecting())
    if torch.cuda.is_available():
        return request.param == "batched", "cuda"
    monkeypatch.setattr(fused_sums, "RUN_ON_CPU", True)
    return request.param == "batched", "cpu"


@pytest.mark.parametrize("build, impl", [(tiny_llama, {"foreach": True}), (tiny_llama, {"foreach": False}),
                                         (tiny_llama, {"fused": True}), (tiny_gpt2, {"foreach": True})])
def test_tracker_matches_weights_saved_around_the_step(build, impl, path, capsys):
    batched, device = path
    torch.manual_seed(0)
    model = build().to(device)
    table = classify_parameters(model, rotational_embeddings=False)
    tracked = [spec for spec in table if spec.tracked]
    cfg = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1)
    tracker = RotationTracker(model, table, cfg, every=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                  **impl)
    x = torch.randint(0, 128, (4, 32)).to(device)
    for step in range(1, 5):
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        measuring = tracker.should_measure(step)
        if measuring:
            tracker.capture()
            before = {s.name: neuron_rows(model.get_parameter(s.name), s.neuron_axis) for s in tracked}
            grads = {s.name: neuron_rows(model.get_parameter(s.name).grad, s.neuron_axis) for s in tracked}
        optimizer.step()
        optimizer.zero_grad()
        if not measuring:
            continue
        scalars = tracker.measure(step, cfg.lr)
        assert scalars and all(math.isfinite(v) for v in scalars.values())
        for spec, layer in zip(tracked, tracker.layers, strict=True):
            w0, w1 = before[spec.name], neuron_rows(model.get_parameter(spec.name), spec.neuron_axis)
            theta = kahan_angle(w0, w1)
            measured = tracker.snapshot[layer]
            np.testing.assert_allclose(measured["theta"].cpu().numpy(), theta, rtol=1e-7)
            np.testing.assert_allclose(measured["grad_norm"].cpu().numpy(), np.linalg.norm(grads[spec.name], axis=1),
                                       rtol=1e-5)
            assert scalars[f"rotation/angle/{layer}"] == pytest.approx(theta.mean(), rel=1e-7)
            assert 0 < scalars[f"rotation/ratio/{layer}"] < 100
    assert list(tracker.history.steps) == [1, 2, 4]
    # Batched: every tracked tensor (all fp32 2-d) went through a Batch, one per shape and axis.
    batches = tracker.source._batches
    assert sum(len(members) for members, batch in batches.items() if batch) == (len(tracked) if batched else 0)
    notices = [line for line in capsys.readouterr().err.splitlines() if "did not compile" in line]
    assert len(notices) == sum(batch is None for batch in batches.values())  # one per shape, rejected or none
    if batches and not batched:  # rejected by the compiler: measured one at a time, same numbers as above
        assert notices and all(batch is None for batch in batches.values())
    assert tracker.summary_line().startswith("θ/η ")
    layers = set(tracker.layers)
    assert {"lm_head", "layers.1.mlp.down_proj"} <= layers or {"wte", "h.1.attn.c_attn"} <= layers


def test_the_optimizer_hooks_source_measures_what_the_weights_show():
    """`OptimizerSource` (DeepSpeed's path; here over whole tensors, as ZeRO stage 0 steps them) against
    the weights' own tracker (checked above against an independent angle), on the same steps. Its sums
    live on the optimizer's device: NCCL reduces nothing else (a GPU run, when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = tiny_llama().to(device)
    table = classify_parameters(model, rotational_embeddings=False)
    cfg = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    hooks = OptimizerSource(optimizer, [s for s in table if s.tracked],
                            {id(p): name for name, p in model.named_parameters()}, {}, None, torch.device(device))
    trackers = [RotationTracker(model, table, cfg, every=1), RotationTracker(model, table, cfg, every=1, source=hooks)]
    x = torch.randint(0, 128, (4, 32)).to(device)
    for step in (1, 2):
        model(input_ids=x, labels=x).loss.backward()
        for tracker in trackers:
            tracker.capture()
        optimizer.step()
        optimizer.zero_grad()
        for tracker in trackers:
            tracker.queue_measure(step, cfg.lr)
    weights, hooked = (tracker.history.values for tracker in trackers)
    assert np.isfinite(weights).all()
    grads = LAYER_METRICS.index("grad_norm")  # summed in another order (and on a GPU by another kernel)
    np.testing.assert_allclose(np.delete(hooked, grads, axis=2), np.delete(weights, grads, axis=2), rtol=1e-7)
    np.testing.assert_allclose(hooked[:, :, grads], weights[:, :, grads], rtol=1e-5)
