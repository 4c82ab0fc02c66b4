"""Distributed training on CPU, 2 ranks over gloo: every strategy is the single-process run.

Reference: the same recipe in one process with the same global batch (grad_accum=2 instead of
2 ranks x 1 micro-step; the loader gives both the same windows). Under DDP, FSDP2 and DeepSpeed
ZeRO 1/2/3, for llama (neuron axis 0) and GPT-2 (Conv1D, neuron axis 1), the loss sequence, the
final weights and the rotation metrics must match it to float tolerance, resume must be exact,
and a dead rank must not hang the others.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.logger import read_metrics
from pretrain.train import train
from tests.train_utils import REPO, tiny_args, tiny_config

# fp32 on CPU. Ranks reduce gradients in another order than one process accumulates them, so
# results agree to rounding, not bit for bit: observed <= 5e-7 on losses, <= 3e-6 on weights
# and <= 2e-6 on angles after 20 steps; <= 5e-7 on gradient norms.
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-5  # ||w - w_ref|| / ||w_ref|| per tensor
ANGLE_RTOL = 1e-4
GRAD_NORM_RTOL = 1e-5
STEPS = 20
# lr 0.1: the RVs rotate by eta_r ~ sqrt(lr), embeddings included (the default), and must visibly learn in 20 steps.
RUN = ["train.steps=20", "checkpoint.every=10", "train.eval_every=10", "optim.lr=0.1"]
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp2": ["parallel.strategy=fsdp2"],
    "zero1": ["parallel.strategy=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}
MODELS = {"llama": ["model.arch=llama"], "gpt2": ["model.arch=gpt2"]}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def torchrun(args: list[str], nproc: int = 2, module: bool = True, **popen) -> subprocess.Popen:
    """`torchrun -m pretrain train ARGS` (or `torchrun ARGS` for a script) on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *(["-m", "pretrain", "train"] if module else []), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def run_torchrun(args: list[str], nproc: int = 2, module: bool = True) -> subprocess.CompletedProcess:
    proc = torchrun(args, nproc, module)
    out, _ = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported `transformers` weights of the newest checkpoint (gathered by rank 0)."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model" / "model.safetensors")


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/grad_norm"] for r in records(run_dir) if "train/grad_norm" in r}


def rotation(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], k): v for r in records(run_dir) for k, v in r.items() if k.startswith("rotation/")}


def assert_weights_match(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for name, w in ref.items():
        g = got[name]
        if name.endswith("attn.c_attn.bias"):
            # GPT-2's key bias gets an exactly zero gradient (softmax ignores a shift shared by all
            # keys), so its "gradient" is rounding noise that Adam normalises to full-size steps:
            # chaotic in any two runs. The query and value thirds are compared.
            d = w.shape[0] // 3
            w, g = torch.cat([w[:d], w[2 * d:]]), torch.cat([g[:d], g[2 * d:]])
        rel = ((g - w).norm() / w.norm().clamp_min(1e-12)).item()
        assert rel <= WEIGHT_RTOL, f"{name}: relative difference {rel:.2e}"


def assert_rotation_match(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        if "/cv/" in key[1]:  # the spread of equal angles is ~1e-6: rounding noise, compared absolutely
            assert abs(got[key] - value) <= 1e-5, key
        else:
            assert got[key] == pytest.approx(value, rel=ANGLE_RTOL, abs=1e-12), key


# (model, optimizer, strategy, extra overrides); "gains": learnable per-neuron gains (parametrized weights).
GAINS = "model.linear_gains=true"
CASES = [(m, "rv-adamw", s, "") for m in MODELS for s in STRATEGIES]
CASES += [("llama", "rv-lion", s, "") for s in STRATEGIES]
CASES += [("gpt2", "rv-lion", s, "") for s in ("fsdp2", "zero2", "zero3")]
CASES += [("llama", "rv-adamw", s, GAINS) for s in ("fsdp2", "zero3")]
# Gradient accumulation inside each rank: 2 ranks x 2 micro-steps against 1 process x 4.
ACCUM = "train.grad_accum=2"
CASES += [("llama", "rv-adamw", s, ACCUM) for s in ("ddp", "fsdp2", "zero2", "zero3")]
# bf16 under each strategy's own mixed precision (autocast for DDP, FSDP2's MixedPrecisionPolicy,
# DeepSpeed's bf16 mode): different rounding, so compared loosely against the fp32 reference.
BF16 = "train.precision=bf16"
# The fused (Triton) optimizer step on FSDP2's local shards, in Triton's interpreter on CPU
# (tests/conftest.py): against the single-process fused run here, and against the eager
# single-process run in test_fused_step_under_fsdp2_equals_the_eager_single_process_run, which
# also checks the fused C++ step under FSDP2 (Runs.fused_cpp).
FUSED = "optim.fused=true"
CASES += [("llama", "rv-adamw", "fsdp2", FUSED)]
# torch's fused AdamW takes the step without a host sync before it (TorchEngine._step_on_device), the
# steps that measure rotation metrics too: DDP's on-device loss average, clipping and skip flag.
ON_DEVICE = "optim.fused=true logging.rotation_every=5"
CASES += [("llama", "adamw", "ddp", ON_DEVICE)]
BF16_STRATEGIES = ("ddp", "fsdp2", "zero2")


def tag(extra: str) -> str:
    """A folder-name tag for a case's extra overrides (space-separated)."""
    return "-".join(part.split(".")[-1].replace("=", "") for part in extra.split()) if extra else "base"


class Runs:
    """All 2-rank runs of this module, trained once by one driver launch, and their references."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir = root, data_dir
        self.references = {(m, o, x): root / f"single-{m}-{o}-{tag(x)}" for m, o, _, x in CASES}
        self.runs = {case: root / f"{'-'.join(case[:3])}-{tag(case[3])}" for case in CASES}
        self.runs.update({("llama", "rv-adamw", s, BF16): root / f"bf16-{s}" for s in BF16_STRATEGIES})
        self.resumed = {s: root / f"resumed-{s}" for s in STRATEGIES}
        # Dropout draws differ per rank, so exact resume needs every rank's RNG stream back.
        self.dropout = {name: root / f"dropout-{name}" for name in ("straight", "resumed")}
        # DeepSpeed without ZeRO (fp32): it does not report the gradient norm, our engine measures it.
        self.zero0 = root / "zero0-llama-rv-adamw"
        # The fused C++ step on FSDP2's local shards (Triton's interpreter off, so CPU tensors take it).
        self.fused_cpp = root / "fsdp2-fused-cpp"

    def args(self, out: Path, *overrides: str) -> list[str]:
        return tiny_args(self.data_dir, out, *RUN, *overrides)

    def train_all(self) -> None:
        for (model, optim, extra), out in self.references.items():
            # One process takes both ranks' micro-steps: twice the grad_accum of one rank.
            accum = 4 if extra == ACCUM else 2
            train(tiny_config(self.data_dir, out, *RUN, *MODELS[model], f"optim.name={optim}",
                              *(extra.split() if extra != ACCUM else []), f"train.grad_accum={accum}"))
        plan = [self.args(out, *MODELS[m], f"optim.name={o}", *STRATEGIES[s], "parallel.world_size=2",
                          *x.split()) for (m, o, s, x), out in self.runs.items()]
        for strategy, out in self.resumed.items():  # interrupted at step 10, then resumed
            args = self.args(out, "optim.name=rv-adamw", *STRATEGIES[strategy])
            plan += [[*args, "--stop-at", "10"], [*args, "--resume", "auto"]]
        dropout = ["model.dropout=0.2", "parallel.strategy=ddp"]
        plan.append(self.args(self.dropout["straight"], *dropout))
        args = self.args(self.dropout["resumed"], *dropout)
        plan += [[*args, "--stop-at", "10"], [*args, "--resume", "auto"]]
        plan.append(self.args(self.zero0, "optim.name=rv-adamw", "parallel.strategy=deepspeed", "parallel.zero_stage=0",
                              "parallel.world_size=2"))
        plan.append({"args": self.args(self.fused_cpp, "optim.name=rv-adamw", *STRATEGIES["fsdp2"], FUSED,
                                       "parallel.world_size=2"), "env": {"TRITON_INTERPRET": "0"}})
        runs_file = self.root / "runs.json"
        runs_file.write_text(json.dumps(plan))
        result = run_torchrun([str(REPO / "tests" / "distributed_driver.py"), str(runs_file)], module=False)
        assert result.returncode == 0, result.stdout[-4000:]
        self.log = result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_dir) -> Runs:
    runs = Runs(tmp_path_factory.mktemp("distributed"), tiny_data_dir)
    runs.train_all()
    return runs


@pytest.mark.parametrize(("model", "optim", "strategy", "extra"), CASES)
def test_strategy_equals_single_process(runs, model, optim, strategy, extra):
    ref, got = runs.references[model, optim, extra], runs.runs[model, optim, strategy, extra]
    ref_losses, got_losses = losses(ref), losses(got)
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    for step, value in ref_losses.items():
        assert got_losses[step] == pytest.approx(value, rel=LOSS_RTOL), step
    assert_weights_match(final_weights(got), final_weights(ref))
    assert_rotation_match(rotation(got), rotation(ref))
    saved = (got / "config.yaml").read_text()
    assert "world_size: 2" in saved  # the run really had two ranks


@pytest.mark.parametrize("kernel", ["triton", "cpp"])
def test_fused_step_under_fsdp2_equals_the_eager_single_process_run(runs, kernel):
    ref = runs.references["llama", "rv-adamw", ""]
    got = runs.fused_cpp if kernel == "cpp" else runs.runs["llama", "rv-adamw", "fsdp2", FUSED]
    for step, value in losses(ref).items():
        assert losses(got)[step] == pytest.approx(value, rel=LOSS_RTOL), step
    assert_weights_match(final_weights(got), final_weights(ref))
    assert_rotation_match(rotation(got), rotation(ref))
    fractions = [r["optim/fused_fraction"] for r in read_metrics(got) if "optim/fused_fraction" in r]
    assert fractions and min(fractions) == 1.0  # every tensor, every step: the fast path really ran


@pytest.mark.parametrize("strategy", [*STRATEGIES, "zero0"])
def test_every_strategy_logs_the_single_process_gradient_norm(runs, strategy):
    """The global norm before clipping, whoever computes it (torch, DeepSpeed ZeRO 1-3, our ZeRO-0 engine)."""
    ref = runs.references["llama", "rv-adamw", ""]
    got = runs.zero0 if strategy == "zero0" else runs.runs["llama", "rv-adamw", strategy, ""]
    ref_norms, got_norms = grad_norms(ref), grad_norms(got)
    assert sorted(got_norms) == list(range(1, STEPS + 1))
    assert max(ref_norms.values()) > 1.0  # some steps are clipped (train.grad_clip=1): the norm is taken before
    for step, value in ref_norms.items():
        assert got_norms[step] == pytest.approx(value, rel=GRAD_NORM_RTOL), step
    if strategy == "zero0":  # not among CASES: the run itself is checked here
        for step, value in losses(ref).items():
            assert losses(got)[step] == pytest.approx(value, rel=LOSS_RTOL), step
        assert_weights_match(final_weights(got), final_weights(ref))


@pytest.mark.parametrize("strategy", BF16_STRATEGIES)
def test_bf16_mixed_precision_trains_under_each_strategy(runs, strategy):
    ref, got = losses(runs.references["llama", "rv-adamw", ""]), losses(runs.runs["llama", "rv-adamw", strategy, BF16])
    assert sorted(got) == sorted(ref)
    for step, value in ref.items():  # bf16 rounding (~0.4% per element), fp32 master weights and reductions
        assert got[step] == pytest.approx(value, rel=2e-2), step
    assert got[STEPS] < got[1] - 0.2  # and it learns
    assert "precision: bf16" in (runs.runs["llama", "rv-adamw", strategy, BF16] / "config.yaml").read_text()


def test_a_bf16_deepspeed_run_exports_its_fp32_master_weights(runs):
    """The model DeepSpeed runs on is bf16; the exported one is what the optimizer holds, as under DDP
    and FSDP2 (DeepSpeed's own zero_to_fp32 reads the same masters from the checkpoint)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = runs.runs["llama", "rv-adamw", "zero2", BF16]
    exported = final_weights(run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    masters = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / latest / "state"))
    assert exported.keys() <= masters.keys()
    for name, w in exported.items():
        assert w.dtype == torch.float32 and torch.equal(w, masters[name]), name
    assert any(not torch.equal(w, w.bfloat16().float()) for w in exported.values())  # not bf16 values


def test_a_bf16_deepspeed_export_says_float32_in_its_config(runs):
    """save_pretrained writes the model's own dtype (bf16 under DeepSpeed) into config.json, and
    from_pretrained's default dtype="auto" follows it: the config must name the exported masters' float32."""
    run = runs.runs["llama", "rv-adamw", "zero2", BF16]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    config = json.loads((run / "checkpoints" / latest / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32", config


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_resume_equals_uninterrupted_run(runs, strategy):
    straight, out = runs.runs["llama", "rv-adamw", strategy, ""], runs.resumed[strategy]
    assert f"resumed from {out}/checkpoints/step_000010 at step 10" in runs.log
    assert losses(out) == losses(straight)  # bit-identical: same world, same reduction order
    got, ref = final_weights(out), final_weights(straight)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert rotation(out) == rotation(straight)


def test_resume_with_dropout_restores_every_ranks_random_stream(runs):
    straight, resumed = runs.dropout["straight"], runs.dropout["resumed"]
    assert losses(resumed) == losses(straight)
    got, ref = final_weights(resumed), final_weights(straight)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# (strategy of the 2-rank first half, overrides of the 1-rank second half)
RESHARDED = {"ddp": ["parallel.strategy=single"], "fsdp2": ["parallel.strategy=fsdp2"],
             "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"]}


@pytest.mark.parametrize("strategy", list(RESHARDED))
def test_resume_on_another_world_size_keeps_the_sample_order(runs, tmp_path, strategy):
    """2 ranks x 1 micro-step, resumed as 1 rank x 2 micro-steps: the same global batches. ZeRO-2 resumes
    as ZeRO-3 through the portable state, RV per-neuron state included."""
    straight = runs.references["llama", "rv-adamw", ""]
    out = tmp_path / "run"
    first = run_torchrun(tiny_args(runs.data_dir, out, *RUN, "optim.name=rv-adamw", *STRATEGIES[strategy],
                                   "--stop-at", "10"))
    assert first.returncode == 0, first.stdout[-3000:]
    if strategy == "zero2":  # DeepSpeed's own converter finds the checkpoint through its `latest` file (no -t)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt = out / "checkpoints" / "step_000010"
        fp32, exported = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "state")), final_weights(out)
        assert exported.keys() <= fp32.keys() and all(torch.equal(fp32[k], exported[k]) for k in exported)
    second = run_torchrun(tiny_args(runs.data_dir, out, *RUN, "optim.name=rv-adamw", *RESHARDED[strategy],
                                    "train.grad_accum=2", "--resume", "auto"), nproc=1)
    assert second.returncode == 0, second.stdout[-3000:]
    got = losses(out)
    for step, value in losses(straight).items():
        assert got[step] == pytest.approx(value, rel=LOSS_RTOL), step
    assert_weights_match(final_weights(out), final_weights(straight))
    if strategy == "zero2":  # the RV state itself, against the uninterrupted 2-rank ZeRO-2 run
        neurons = [load_file(run / "checkpoints" / "step_000020" / "state" / "portable" / "rank00000.safetensors")
                   for run in (out, runs.runs["llama", "rv-adamw", "zero2", ""])]
        keys = [k for k in neurons[1] if "/neurons/" in k]
        assert any(k.endswith("update_norm_avg") for k in keys) and any(k.endswith("neuron_norm") for k in keys)
        for key in keys:
            rel = ((neurons[0][key] - neurons[1][key]).norm() / neurons[1][key].norm().clamp_min(1e-12)).item()
            assert rel <= WEIGHT_RTOL, (key, rel)


def test_resume_refuses_a_different_global_batch(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    first = run_torchrun(tiny_args(tiny_data_dir, out, *RUN, "parallel.strategy=ddp", "--stop-at", "10"))
    assert first.returncode == 0, first.stdout[-3000:]
    second = run_torchrun(tiny_args(tiny_data_dir, out, *RUN, "parallel.strategy=single", "--resume", "auto"),
                          nproc=1)
    assert second.returncode != 0  # the worker exits with 2, torchrun reports the failure with 1
    assert "error: checkpoint" in second.stdout and "global batch" in second.stdout


def wait_for_steps(out: Path, count: int, alive: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and len(records(out)) >= count):
        for proc in alive:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)


def test_deepspeed_without_zero_refuses_to_resume_on_another_world_size(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    zero = ["parallel.strategy=deepspeed", "parallel.zero_stage=0"]
    first = run_torchrun(tiny_args(tiny_data_dir, out, *RUN, *zero, "--stop-at", "10"))
    assert first.returncode == 0, first.stdout[-3000:]
    second = run_torchrun(tiny_args(tiny_data_dir, out, *RUN, *zero, "train.grad_accum=2", "--resume", "auto"),
                          nproc=1)
    assert second.returncode != 0
    assert "only between ZeRO stages 1-3 (now 1 rank(s), stage 0)" in second.stdout


def test_a_killed_rank_stops_the_others(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(tiny_args(tiny_data_dir, out, "train.steps=100000", "checkpoint.every=100000",
                              "parallel.strategy=ddp", "parallel.timeout_s=60"), start_new_session=True)
    try:
        wait_for_steps(out, 3, [proc])
        os.kill(rank_process(proc.pid, rank=1), signal.SIGKILL)
        killed_at = time.monotonic()
        proc.communicate(timeout=120)  # bounded: torchrun's agent stops rank 0
        assert proc.returncode != 0
        assert time.monotonic() - killed_at < 120
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert not (out / "checkpoints" / "latest").exists()  # nothing half-written was published


def start_agentless_ranks(args: list[str], port: int, stderr: int) -> list[subprocess.Popen]:
    """Two ranks of `pretrain train ARGS` started directly, without torchrun (as `srun python ...` would)."""
    procs = []
    for rank in (0, 1):
        env = {**launch_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", "train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=stderr, text=True))
    return procs


def test_without_an_agent_a_dead_peer_fails_the_survivor(tiny_data_dir, tmp_path):
    """Ranks started directly (as `srun python ...` would): no agent, the collectives must fail on their own."""
    out, port = tmp_path / "run", free_port()
    args = tiny_args(tiny_data_dir, out, "train.steps=100000", "checkpoint.every=100000", "parallel.strategy=ddp",
                     "parallel.timeout_s=30")
    procs = start_agentless_ranks(args, port, stderr=subprocess.STDOUT)
    try:
        wait_for_steps(out, 3, procs)
        procs[1].kill()
        killed_at = time.monotonic()
        procs[0].communicate(timeout=150)  # the collective timeout (30 s) at the latest, plus shutdown
        assert procs[0].returncode != 0
        assert time.monotonic() - killed_at < 150
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def rank_process(launcher_pid: int, rank: int) -> int:
    """The pid of the worker process of `rank` among the launcher's descendants (from /proc)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
            stat = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and int(stat[1]) == launcher_pid:
            return int(proc_dir.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def test_a_world_size_mismatch_fails_fast(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_torchrun(tiny_args(tiny_data_dir, out, "parallel.strategy=ddp", "parallel.world_size=3"))
    assert result.returncode != 0
    assert "parallel.world_size=3 but the launcher started 2 process(es)" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize("bad", [["optim.weight_decay=0"], ["--resume", "no-such-checkpoint"]],
                         ids=["config", "after-the-group-is-up"])
def test_a_user_error_in_a_multi_rank_launch_is_one_line(tiny_data_dir, tmp_path, bad):
    """`python -m pretrain.launch` (torchrun's arguments): rank 0 says it once, no launcher report, exit 2."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "pretrain", "train",
           *tiny_args(tiny_data_dir, out, "parallel.strategy=deepspeed", "parallel.zero_stage=1", *bad)]
    result = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad[-1].split("=")[0] in lines[0], lines
    assert not out.exists()


def test_a_hung_rank_stops_the_job_through_the_step_watchdog(tiny_data_dir, tmp_path):
    """A stopped (SIGSTOP) peer never fails a collective; the step watchdog ends the survivor long before
    the collective timeout (600 s here), also when the survivor waits for it at the end of an evaluation
    (every step evaluates here, so the stop lands in training or in evaluation alike)."""
    out, port = tmp_path / "run", free_port()
    args = tiny_args(tiny_data_dir, out, "train.steps=100000", "checkpoint.every=100000", "parallel.strategy=ddp",
                     "parallel.timeout_s=600", "parallel.step_timeout_s=3", "train.eval_every=1")
    procs = start_agentless_ranks(args, port, stderr=subprocess.PIPE)
    try:
        wait_for_steps(out, 3, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode != 0
        assert "made no progress" in err and "parallel.step_timeout_s" in err, err[-2000:]
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert (out / "metrics.jsonl").is_file()  # the run is kept


# fp16 under each strategy's loss scaler, started at a scale the tiny model's fp16 gradients cannot
# hold: torch's GradScaler (DDP, FSDP2) through a launch script that sets its initial scale,
# DeepSpeed's own scaler (ZeRO 2, 3) through the JSON (hysteresis 1: it halves on every overflow).
FP16_START = 2.0 ** 26
FP16 = [*RUN, "optim.lr=0.1", "train.precision=fp16", "parallel.world_size=2"]
FP16_LAUNCH = """import functools, runpy, sys, torch
torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale={scale})
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# DeepSpeed's CPU accelerator refuses fp16 unless oneDNN runs fp16 on this CPU (AVX512-FP16 or AMX-FP16).
deepspeed_fp16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_fp16_supported(),
                                    reason="DeepSpeed's CPU accelerator supports fp16 only on CPUs with fp16 units")


def assert_overflows_skipped(out: Path) -> None:
    """Steps 1-3 (at least) overflowed and were skipped, the logged scale halved once per overflow so
    far (neither scaler grows it within 1000 clean steps), and the run went on to the end and learned."""
    assert (out / "checkpoints" / f"step_{STEPS:06d}").is_dir()
    logged = {r["step"]: r for r in records(out) if "train/loss" in r}
    skipped = sorted(set(range(1, STEPS + 1)) - set(logged))
    assert skipped[:3] == [1, 2, 3], skipped
    for step, record in logged.items():
        assert record["train/loss_scale"] == FP16_START / 2 ** sum(1 for s in skipped if s < step), step
    assert logged[max(logged)]["train/loss"] < logged[min(logged)]["train/loss"] - 0.05


def overflow_lines_of_step_1(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("fp16 loss-scale overflow at step 1,")]


def test_fp16_overflows_are_skipped_steps_under_ddp_and_fsdp2(tiny_data_dir, tmp_path):
    launch = tmp_path / "launch.py"
    launch.write_text(FP16_LAUNCH.format(scale=FP16_START))
    strategies = ("ddp", "fsdp2")
    (tmp_path / "runs.json").write_text(json.dumps([tiny_args(tiny_data_dir, tmp_path / s, *FP16, *STRATEGIES[s])
                                                    for s in strategies]))
    result = run_torchrun([str(launch), str(REPO / "tests" / "distributed_driver.py"), str(tmp_path / "runs.json")],
                          module=False)
    assert result.returncode == 0, result.stdout[-4000:]
    for strategy in strategies:
        assert_overflows_skipped(tmp_path / strategy)
    assert len(overflow_lines_of_step_1(result.stdout)) == len(strategies)  # said once per run, by rank 0


@deepspeed_fp16
def test_deepspeed_fp16_overflows_are_skipped_steps_and_a_non_finite_loss_stops(tiny_data_dir, tmp_path):
    (tmp_path / "fp16.json").write_text(json.dumps({"fp16": {"initial_scale_power": 26, "hysteresis": 1}}))
    ds_json = f"parallel.deepspeed_config={tmp_path / 'fp16.json'}"
    strategies = ("zero2", "zero3")
    plan = [tiny_args(tiny_data_dir, tmp_path / s, *FP16, *STRATEGIES[s], ds_json) for s in strategies]
    # Last (the driver stops at the first failing run): a loss that really diverges still stops the run.
    plan.append(tiny_args(tiny_data_dir, tmp_path / "diverged", *FP16, *STRATEGIES["zero2"], "optim.name=adamw",
                          "optim.lr=1e30", "train.grad_clip=0", "checkpoint.every=1"))
    (tmp_path / "runs.json").write_text(json.dumps(plan))
    result = run_torchrun([str(REPO / "tests" / "distributed_driver.py"), str(tmp_path / "runs.json")], module=False)
    assert result.returncode != 0, result.stdout[-4000:]  # the last run, as it should
    for strategy in strategies:
        assert_overflows_skipped(tmp_path / strategy)
    assert len(overflow_lines_of_step_1(result.stdout)) == len(strategies)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "loss became" in errors[0] and "train.nan_policy=stop" in errors[0], errors
    assert (tmp_path / "diverged" / "checkpoints" / "step_000001").is_dir()


@deepspeed_fp16
def test_deepspeed_fp16_overflowing_at_its_minimum_scale_stops_after_max_skips(tiny_data_dir, tmp_path):
    """DeepSpeed would raise a bare Exception at its minimum scale; the run stops with the loop's one line."""
    (tmp_path / "fp16.json").write_text(json.dumps({"fp16": {"initial_scale_power": 40, "min_loss_scale": 2 ** 39,
                                                             "hysteresis": 1}}))
    out = tmp_path / "run"
    result = run_torchrun(tiny_args(tiny_data_dir, out, *STRATEGIES["zero2"], "train.precision=fp16",
                                    f"parallel.deepspeed_config={tmp_path / 'fp16.json'}", "train.max_skips=3",
                                    "checkpoint.every=2"))
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: the fp16 gradient overflowed on 4 steps in a row"), \
        result.stdout[-3000:]
    assert f"loss scale now {2.0 ** 39}" in errors[0] and "already at minimum" not in result.stdout
    assert (out / "checkpoints" / "step_000002").is_dir() and str(out / "checkpoints" / "step_000002") in errors[0]
