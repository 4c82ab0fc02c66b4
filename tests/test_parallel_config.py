"""The launch check, the DeepSpeed config derived from the run config, the step watchdog and leaving the group."""

import json
import subprocess
import sys
import typing
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pretrain.config import ParallelConfig, load_config
from pretrain.errors import UserError
from pretrain.parallel import ENGINES
from pretrain.parallel.world import StepWatchdog, World, check_world, close_world
from pretrain.parallel.zero import DeepSpeedEngine, deepspeed_config
from tests.train_utils import REPO


def config(*overrides: str):
    return load_config(REPO / "configs" / "tiny-cpu.yaml", list(overrides))


@pytest.fixture(autouse=True)
def clean_launch_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                 "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)


def test_world_comes_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert check_world(config("parallel.strategy=ddp", "parallel.world_size=4")) == World(3, 4, 1)


def test_without_a_launcher_the_world_is_one_process():
    assert check_world(config()) == World(0, 1, 0)


@pytest.mark.parametrize(("env", "overrides", "message"), [
    ({"WORLD_SIZE": "1"}, ["parallel.strategy=ddp", "parallel.world_size=2"],
     "parallel.world_size=2 but the launcher started 1 process(es)"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["parallel.strategy=single"], "parallel.strategy=single"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, ["parallel.strategy=ddp"], "RANK=2"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, ["parallel.strategy=ddp"], "enables its fsdp2 plugin"),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, ["parallel.strategy=fsdp2"], "enables its fsdp2 plugin"),
    ({"WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}, ["parallel.strategy=ddp", "train.precision=fp32"],
     "--mixed_precision bf16"),
    ({"WORLD_SIZE": "two"}, ["parallel.strategy=ddp"], "WORLD_SIZE='two' is not an integer"),
    ({}, ["parallel.strategy=deepspeed", "parallel.zero_stage=0", "train.precision=bf16"], "zero_stage to 1, 2 or 3"),
])
def test_a_launch_that_differs_from_the_config_is_refused(monkeypatch, env, overrides, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_world(config(*overrides))


def test_an_accelerate_mixed_precision_equal_to_the_config_is_accepted(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert check_world(config("train.precision=bf16")) == World(0, 1, 0)


def test_deepspeed_skip_policy_is_refused_at_load():
    with pytest.raises(UserError, match="nan_policy=skip is not available under DeepSpeed"):
        config("parallel.strategy=deepspeed", "train.nan_policy=skip")


def test_deepspeed_config_follows_the_run_config_and_merges_the_json(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123, "stage": 2},
                                 "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 7}))
    cfg = config("parallel.strategy=deepspeed", "parallel.zero_stage=2", f"parallel.deepspeed_config={extra}",
                 "train.micro_batch_size=4", "train.grad_accum=3", "train.grad_clip=0.5")
    ds = deepspeed_config(cfg, World(0, 2, 0), torch.bfloat16)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"reduce_bucket_size": 123, "stage": 2}
    assert ds["steps_per_print"] == 7


def test_deepspeed_fp16_loss_scaling_keys_pass_through_and_the_run_config_owns_enabled(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"initial_scale_power": 12, "hysteresis": 1}}))
    cfg = config("parallel.strategy=deepspeed", "parallel.zero_stage=1", f"parallel.deepspeed_config={path}")
    ds = deepspeed_config(cfg, World(0, 2, 0), torch.float16)
    assert ds["fp16"] == {"initial_scale_power": 12, "hysteresis": 1, "enabled": True}
    assert ds["bf16"] == {"enabled": False}
    path.write_text(json.dumps({"fp16": {"enabled": False, "initial_scale_power": 12}}))
    with pytest.raises(UserError, match="sets fp16.enabled=False but the run config gives True"):
        deepspeed_config(cfg, World(0, 2, 0), torch.float16)


@pytest.mark.parametrize(("content", "message"), [
    ({"gradient_clipping": 2.0}, "gradient_clipping=2.0 but the run config gives 1.0"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 but parallel.zero_stage=1"),
    ({"optimizer": {"type": "Adam"}}, "sets 'optimizer', which the run config owns"),
    ({"zero_optimization": {"compute_grad_norm": False}}, "compute_grad_norm=false"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer, which this project's"),
])
def test_a_deepspeed_json_that_contradicts_the_run_config_is_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    cfg = config("parallel.strategy=deepspeed", "parallel.zero_stage=1", f"parallel.deepspeed_config={path}")
    with pytest.raises(UserError, match=message):
        deepspeed_config(cfg, World(0, 2, 0), torch.float32)


def test_the_shipped_deepspeed_json_is_accepted():
    cfg = config("parallel.strategy=deepspeed", "parallel.zero_stage=3",
                 f"parallel.deepspeed_config={REPO / 'launch' / 'deepspeed' / 'zero.json'}")
    assert deepspeed_config(cfg, World(0, 2, 0), torch.float32)["zero_optimization"]["stage"] == 3


def test_every_strategy_the_config_accepts_has_exactly_one_engine_builder():
    assert set(ENGINES) == set(typing.get_args(typing.get_type_hints(ParallelConfig)["strategy"]))


def test_deepspeed_on_another_device_than_the_run_is_refused_in_one_line(monkeypatch):
    # E.g. the CPU tests' DS_ACCELERATOR=cpu left set on a GPU node, or train.device=cpu there: DeepSpeed
    # would move the model to its accelerator, away from the batches.
    accelerator = pytest.importorskip("deepspeed.accelerator")
    monkeypatch.setattr(accelerator, "get_accelerator", lambda: SimpleNamespace(device_name=lambda: "cuda"))
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    cfg = config("parallel.strategy=deepspeed", "parallel.zero_stage=1", "train.device=cpu")
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match=r"accelerator is cuda \(DS_ACCELERATOR=cuda\) but the run trains on cpu"):
        DeepSpeedEngine(model, torch.optim.AdamW(model.parameters()), World(0, 1, 0), cfg, [], torch.float32)


def test_the_step_watchdog_thread_ends_with_stop():
    """No thread of the run lives on into interpreter exit (where a waking thread can abort the process)."""
    watchdog = StepWatchdog(limit_s=60.0, rank=0, enabled=True)
    thread = watchdog._thread
    assert thread is not None and thread.is_alive()
    watchdog.beat(1)
    watchdog.stop()
    assert not thread.is_alive()


def test_a_stalled_step_ends_the_process_with_one_line():
    code = ("import time\nfrom pretrain.parallel.world import StepWatchdog\n"
            "w = StepWatchdog(limit_s=0.3, rank=1, enabled=True)\nw.beat(1); w.beat(2)\ntime.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: step 2 made no progress"), done.stderr
    assert "--resume auto" in lines[0]


def test_close_world_frees_the_runs_cycles_before_it_leaves_the_group(tmp_path):
    """FSDP2's modules and DTensors sit in reference cycles that hold the process group; left to the
    interpreter's exit, their teardown races gloo's threads. close_world collects them while the group lives."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    group_alive_when_freed: list[bool] = []

    class Holder:  # a cycle, as a sharded module and its state form
        pass

    holder = Holder()
    holder.me = holder
    weakref.finalize(holder, lambda: group_alive_when_freed.append(dist.is_initialized()))
    del holder
    close_world()
    assert group_alive_when_freed == [True] and not dist.is_initialized()


def test_close_world_on_a_finished_rank_whose_peer_failed_after_the_loop(tmp_path):
    """Rank 0 fails after the loop (its plot, its run folder) and leaves without a word to the group;
    rank 1 finished: it leaves quietly (review s11: a barrier there made it fail with gloo's traceback)."""
    code = ("import datetime, sys, torch.distributed as dist\nfrom pretrain.parallel.world import close_world\n"
            "rank = int(sys.argv[1])\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=rank, world_size=2, "
            "timeout=datetime.timedelta(seconds=30))\n"
            "if rank == 0:\n    sys.exit(3)\n"
            "close_world()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert results[0][0] == 3, results[0][1]
    assert results[1][0] == 0 and "Traceback" not in results[1][1], results[1][1]
