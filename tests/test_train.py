"""End-to-end training on the fixture corpus: HF reload, exact resume, learning, errors."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pretrain.cli import main
from pretrain.logger import MetricsLogger, read_metrics
from pretrain.metrics import RotationTracker, load_rotation
from pretrain.model import build_model
from pretrain.train import train, train_step
from tests.train_utils import tiny_args, tiny_config


def test_checkpoint_reloads_with_transformers_and_gives_training_logits(tiny_data_dir, tmp_path):
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", "model.linear_gains=true", "train.steps=4")
    result = train(cfg)
    ckpt = result.checkpoint
    assert ckpt is not None and (ckpt / "model" / "model.safetensors").is_file()
    # The training-time model, rebuilt from the raw (gains unfolded) training weights.
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    reference = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer.eos_token_id)
    reference.load_state_dict(load_file(ckpt / "state" / "model.safetensors"), strict=False)
    assert any("gain" in k for k in load_file(ckpt / "state" / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    ids = [tokenizer(text).input_ids[:6] for text in ("To be, or not to be, that is", "def main():\n    return 0")]
    batch = torch.tensor(ids)
    with torch.no_grad():
        expected = reference.eval()(input_ids=batch).logits
        got = loaded(input_ids=batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("optimizer", ["adamw", "rv-adamw"])
def test_resume_is_exact(tiny_data_dir, tmp_path, optimizer):
    straight = train(tiny_config(tiny_data_dir, tmp_path / "a", f"optim.name={optimizer}"))
    cfg_b = tiny_config(tiny_data_dir, tmp_path / "b", f"optim.name={optimizer}")
    first = train(cfg_b, stop_at=4)
    assert first.step == 4
    second = train(cfg_b, resume="auto")
    assert {**first.losses, **second.losses} == straight.losses  # bit-identical loss sequence
    final_a = load_file(straight.checkpoint / "state" / "model.safetensors")
    final_b = load_file(second.checkpoint / "state" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    # The metrics log describes one trajectory: one train/loss per step, no duplicates.
    steps = [line for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    assert len(steps) == 8


def test_measured_steps_log_their_own_rotation_figures_in_step_order(tiny_data_dir, tmp_path, monkeypatch):
    # The loop writes a measured step's record once the next step is queued (its figures arrive
    # meanwhile), before a checkpoint and at the end: the file still holds one record per step, in
    # order, each with its own step's figures.
    events = []
    monkeypatch.setattr("pretrain.train.train_step", lambda run, step: events.append(("run", step)) or
                        train_step(run, step))
    log = MetricsLogger.log
    monkeypatch.setattr(MetricsLogger, "log", lambda logger, step, values: events.append(("log", step)) or
                        log(logger, step, values))
    result = train(tiny_config(tiny_data_dir, tmp_path / "run", "optim.name=rv-adamw", "logging.rotation_every=2"))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9)) and all("train/loss" in r for r in records)
    # Measured: 1, 2, 4, 6, 8; checkpoints at 4 and 8 (the end). Logged after the next step started:
    # the measured steps no checkpoint follows; the others before it.
    late = [step for step in range(1, 8) if events.index(("log", step)) > events.index(("run", step + 1))]
    assert late == [1, 2, 6]
    history = load_rotation(result.run_dir / "checkpoints" / "step_000008" / "rotation").history
    assert history.steps.tolist() == [1, 2, 4, 6, 8]
    for row, step in enumerate(history.steps):
        for i, layer in enumerate(history.layers):
            assert records[step - 1][f"rotation/angle/{layer}"] == history.column("theta_mean")[row, i]
    assert not any(key.startswith("rotation/") for key in records[2])  # step 3 was not measured


@pytest.mark.parametrize("read_fails", [False, True])
def test_a_failing_step_still_logs_the_measured_step_before_it(tiny_data_dir, tmp_path, monkeypatch, read_fails):
    # The record held for step 2 is written on the way out; if that read fails too (a broken device),
    # the step's own error still is the one raised.
    def failing_at_3(run, step):
        if step == 3:
            raise RuntimeError("out of memory")
        return train_step(run, step)

    monkeypatch.setattr("pretrain.train.train_step", failing_at_3)
    scalars = RotationTracker.scalars

    def read(tracker: RotationTracker, step: int) -> dict[str, float]:
        if read_fails and step == 2:
            raise RuntimeError("device lost")
        return scalars(tracker, step)

    monkeypatch.setattr(RotationTracker, "scalars", read)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_config(tiny_data_dir, tmp_path / "run"))
    records = read_metrics(tmp_path / "run")  # kept: it logged metrics
    assert [r["step"] for r in records] == ([1] if read_fails else [1, 2])
    assert all("rotation/angle/embed_tokens" in r for r in records)


def test_loss_falls_well_below_unigram_entropy(tiny_data_dir, tmp_path, read_split):
    # The val split's own unigram entropy: no model that ignores context can do better on it.
    val_tokens = read_split(tiny_data_dir, "val").astype(np.int64)
    probs = np.bincount(val_tokens)[np.bincount(val_tokens) > 0] / len(val_tokens)
    unigram_entropy = float(-(probs * np.log(probs)).sum())
    result = train(tiny_config(tiny_data_dir, tmp_path / "run", "model.hidden_size=64", "model.num_heads=4",
                               "model.intermediate_size=128", "train.steps=200", "train.micro_batch_size=8",
                               "data.seq_len=64", "train.eval_every=200", "train.eval_batches=4", "optim.lr=1e-2",
                               "checkpoint.every=1000", "logging.rotation_every=50", "logging.log_every=50",
                               # A rotational embedding moves by eta_r ~ 0.01 rad per step at this lr: too
                               # little in 200 steps for this check of the loop (docs/study-cpu/).
                               "optim.rotational_embeddings=false"))
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert result.val_loss < unigram_entropy - 0.5, (result.val_loss, unigram_entropy)


def _run_cli(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean optim.lr?"),
    ("train.steps=many", "train.steps must be int"),
    ("data.seq_len=100000", "seq_len"),
])
def test_bad_input_is_one_line_error_without_run_dir(tiny_data_dir, tmp_path, capsys, override, message):
    code, errors = _run_cli(capsys, ["train", *tiny_args(tiny_data_dir, tmp_path / "run", override)])
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_missing_data_dir_is_one_line_error(tmp_path, capsys):
    code, errors = _run_cli(capsys, ["train", *tiny_args(tmp_path / "no-data", tmp_path / "run")])
    assert code == 2 and len(errors) == 1 and "pretrain prepare" in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_resuming_with_an_incompatible_config_is_refused(tiny_data_dir, tmp_path, capsys):
    assert main(["train", *tiny_args(tiny_data_dir, tmp_path / "run", "train.steps=4")]) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    code, errors = _run_cli(capsys, ["train", *tiny_args(tiny_data_dir, tmp_path / "run", "train.steps=4",
                                                         "optim.lr=1e-4"), "--resume", "auto"])
    assert code == 2 and len(errors) == 1 and "incompatible config" in errors[0] and "optim.lr" in errors[0]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    # A fresh start over a run that has checkpoints is refused too, instead of overwriting it.
    code, errors = _run_cli(capsys, ["train", *tiny_args(tiny_data_dir, tmp_path / "run", "train.steps=4")])
    assert code == 2 and "--resume auto" in errors[0]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path, capsys):
    # An absurd learning rate blows the weights up after the first update; step 1 is checkpointed.
    args = tiny_args(tiny_data_dir, tmp_path / "run", "optim.name=adamw", "optim.lr=1e30", "checkpoint.every=1",
                     "train.grad_clip=0")
    code, errors = _run_cli(capsys, ["train", *args])
    assert code == 2 and len(errors) == 1 and "train.nan_policy=stop" in errors[0], errors
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest in errors[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / latest / "model")
    assert model is not None


@pytest.mark.parametrize(("name", "local_rank", "world", "expected"), [
    ("cuda", 1, 2, "cuda:1"),  # each rank its LOCAL_RANK's GPU
    ("cuda:1", 0, 1, "cuda:1"),  # one process on the GPU it names
    ("cuda:1", 0, 2, "names one GPU for all 2 ranks"),
    ("cuda:2", 0, 1, "sees 2 GPU(s)"),
    ("cuda", 2, 3, "LOCAL_RANK=2 but this process sees 2 GPU(s)"),
])
def test_pick_device_refuses_a_gpu_the_launch_cannot_use(monkeypatch, name, local_rank, world, expected):
    """With two (pretended) GPUs: a device every rank would share, or one that is not there, is one line."""
    from pretrain.errors import UserError
    from pretrain.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if expected.startswith("cuda"):
        assert pick_device(name, local_rank, world) == torch.device(expected)
    else:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            pick_device(name, local_rank, world)
