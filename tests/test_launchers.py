"""Every supported launcher really starts a 2-rank run (CPU, gloo), and the silent fallbacks are refused.

Each multi-process test trains the tiny model for 4 steps with 2 ranks x micro-batch 4 and checks
it against an independent reference: one process with grad_accum=2 (the same global batch of 8).
Matching losses at every step and matching final weights prove that two ranks each trained on
their half of the batch and averaged gradients; one process alone would see half the batch.

Launchers covered: torchrun, launch/torchrun/multinode.sh as two "nodes" on localhost,
launch/slurm/node.sh under a faked SLURM allocation, `accelerate launch` with
launch/accelerate/multi-gpu.yaml, and the `deepspeed` launcher. `accelerate launch --cpu` and the
`deepspeed` launcher without --num_gpus start ONE process on CPU; with parallel.world_size=2 the
run must refuse to start. The shell scripts' environment handling is also checked without
training, through a stand-in torchrun that prints its arguments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train_utils import REPO, tiny_args, tiny_config

BIN = Path(sys.executable).parent  # the environment's torchrun / accelerate / deepspeed
TIMEOUT = 300
STEPS = ["train.steps=4", "checkpoint.every=4"]
MULTINODE = REPO / "launch" / "torchrun" / "multinode.sh"
SLURM_NODE = REPO / "launch" / "slurm" / "node.sh"
SLURM_BATCH = REPO / "launch" / "slurm" / "train.sbatch"
ACCELERATE_CONFIGS = REPO / "launch" / "accelerate"


def _tool(name: str) -> str:
    """A launcher the project installs (torch, accelerate, deepspeed are dependencies) next to this python."""
    path = BIN / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}; pip install -e '.[dev]'"
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch_env(**extra: str) -> dict[str, str]:
    """The test's environment without any launcher / SLURM / accelerate state it may run under."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "ACCELERATE_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "NNODES", "NODE_RANK", "NPROC_PER_NODE", "TORCHRUN", "LOCAL_SIZE", "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TORCHRUN=str(BIN / "torchrun"),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # A session of its own, so that a hung launch is killed with all the ranks it started.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(*procs: subprocess.Popen) -> list[tuple[int, str]]:
    """Wait for every process (TIMEOUT in all); a launch that hangs is killed and fails the test."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        pytest.fail(f"a launch did not finish within {TIMEOUT} s")
    return results


def run(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    return finish(start(cmd, env))[0]


def assert_ok(rc: int, out: str) -> None:
    assert rc == 0, f"exit {rc}:\n{out[-6000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row}


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "step_000004" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory) -> Path:
    """One process, grad_accum=2: the global batch of 2 ranks x grad_accum=1, computed without any launcher."""
    from pretrain.train import train

    run_dir = tmp_path_factory.mktemp("launchers") / "reference"
    train(tiny_config(tiny_data_dir, run_dir, *STEPS, "train.grad_accum=2"))
    return run_dir


def assert_two_rank_run(run_dir: Path, reference: Path, strategy: str = "ddp") -> None:
    import torch

    parallel = yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]
    assert (parallel["strategy"], parallel["world_size"]) == (strategy, 2)
    want = losses(reference)
    got = losses(run_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert got == pytest.approx(want, rel=1e-5)
    ref_weights, weights = final_weights(reference), final_weights(run_dir)
    assert weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def two_rank_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_args(data_dir, run_dir, *STEPS, "parallel.strategy=ddp", "parallel.world_size=2", *extra)


# --- multi-process launches that must train with 2 ranks ---------------------------------------


@pytest.mark.slow
def test_torchrun_single_node(tiny_data_dir, tmp_path, reference):
    run_dir = tmp_path / "run"
    cmd = [_tool("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "pretrain", "train", *two_rank_args(tiny_data_dir, run_dir)]
    assert_ok(*run(cmd, launch_env()))
    assert_two_rank_run(run_dir, reference)


@pytest.mark.slow
def test_multinode_script_as_two_nodes_on_localhost(tiny_data_dir, tmp_path, reference):
    """Two torchrun agents (one per "node", one process each) meet at a real static rendezvous."""
    run_dir = tmp_path / "run"
    args = two_rank_args(tiny_data_dir, run_dir)
    common = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [start(["bash", str(MULTINODE), *args], launch_env(**common, NODE_RANK=str(rank))) for rank in (0, 1)]
    for rc, out in finish(*nodes):
        assert_ok(rc, out)
    assert_two_rank_run(run_dir, reference)


@pytest.mark.slow
def test_slurm_node_script_as_two_nodes(tiny_data_dir, tmp_path, reference):
    """node.sh under a faked 2-node allocation: rendezvous host from the nodelist via scontrol, port from the job id."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # Answers only for the job's own (compressed) nodelist; the first host is this machine.
    (fake_bin / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[1-2]" ] || exit 1\n'
                                       "echo 127.0.0.1\necho node2\n")
    (fake_bin / "scontrol").chmod(0o755)
    port = next(p for p in random.Random().sample(range(20000, 30000), 200) if port_is_free(p))
    job_id = 5_000_000 + port - 20000  # node.sh's port is 20000 + SLURM_JOB_ID % 10000
    run_dir = tmp_path / "run"
    args = two_rank_args(tiny_data_dir, run_dir)
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": str(job_id),
             "SLURM_GPUS_ON_NODE": "1", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    nodes = [start(["bash", str(SLURM_NODE), *args], launch_env(**slurm, SLURM_NODEID=str(n), SLURM_PROCID=str(n)))
             for n in (0, 1)]
    outputs = finish(*nodes)
    for rc, out in outputs:
        assert_ok(rc, out)
    assert f"rendezvous 127.0.0.1:{port}" in outputs[0][1]
    assert_two_rank_run(run_dir, reference)


@pytest.mark.slow
def test_accelerate_multi_gpu_config_starts_two_ranks(tiny_data_dir, tmp_path, reference):
    run_dir = tmp_path / "run"
    cmd = [_tool("accelerate"), "launch", "--config_file", str(ACCELERATE_CONFIGS / "multi-gpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "pretrain", "train", *two_rank_args(tiny_data_dir, run_dir)]
    # No ACCELERATE_USE_CPU needed: a MULTI_GPU config starts the processes on a CPU-only machine as well
    # (it only matters to scripts that build an accelerate Accelerator, which pretrain does not).
    assert_ok(*run(cmd, launch_env(HF_HOME=str(tmp_path / "hf"))))
    assert_two_rank_run(run_dir, reference)


@pytest.mark.slow
def test_deepspeed_launcher_with_num_gpus_trains_zero1_on_two_ranks(tiny_data_dir, tmp_path, reference):
    """On CPU, `deepspeed --num_gpus 2` really starts 2 processes. --no_local_rank: the launcher would
    otherwise insert `--local_rank=N` before the subcommand (we take LOCAL_RANK from the environment)."""
    run_dir = tmp_path / "run"
    cmd = [_tool("deepspeed"), "--hostfile", str(tmp_path / "no-hostfile"), "--num_gpus", "2",
           "--master_port", str(free_port()), "--no_local_rank", "--module", "pretrain", "train",
           *tiny_args(tiny_data_dir, run_dir, *STEPS, "parallel.strategy=deepspeed", "parallel.zero_stage=1",
                      "parallel.world_size=2")]
    assert_ok(*run(cmd, launch_env()))
    assert_two_rank_run(run_dir, reference, strategy="deepspeed")


# --- launches that start fewer processes than the config asks for must be refused -------------


def assert_refused(rc: int, out: str, run_dir: Path) -> None:
    assert rc != 0, out[-6000:]
    assert "parallel.world_size=" in out and "process(es)" in out, out[-6000:]
    assert not run_dir.exists()


@pytest.mark.slow
def test_accelerate_cpu_flag_starts_one_process_and_is_refused(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [_tool("accelerate"), "launch", "--cpu", "--num_processes", "2",
           "-m", "pretrain", "train", *two_rank_args(tiny_data_dir, run_dir)]
    rc, out = run(cmd, launch_env(HF_HOME=str(tmp_path / "hf")))
    assert_refused(rc, out, run_dir)
    assert "launcher started 1 process(es)" in out


@pytest.mark.slow
def test_deepspeed_launcher_without_num_gpus_starts_one_process_and_is_refused(tiny_data_dir, tmp_path):
    """Without --num_gpus the launcher starts one process per CPU "device": per NUMA node (LOCAL_SIZE
    overrides it). LOCAL_SIZE=1 pins the usual one-socket case, whatever this machine's layout."""
    run_dir = tmp_path / "run"
    cmd = [_tool("deepspeed"), "--hostfile", str(tmp_path / "no-hostfile"), "--master_port", str(free_port()),
           "--no_local_rank", "--module", "pretrain", "train", *two_rank_args(tiny_data_dir, run_dir)]
    rc, out = run(cmd, launch_env(LOCAL_SIZE="1"))
    assert_refused(rc, out, run_dir)
    assert "launcher started 1 process(es)" in out


@pytest.mark.slow
def test_torchrun_world_size_mismatch_fails_fast_without_run_dir(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [_tool("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "pretrain", "train", *tiny_args(tiny_data_dir, run_dir, *STEPS, "parallel.strategy=ddp",
                                                 "parallel.world_size=3")]
    rc, out = run(cmd, launch_env())
    assert_refused(rc, out, run_dir)
    assert "parallel.world_size=3 but the launcher started 2 process(es)" in out


# --- the scripts' environment handling, with a stand-in torchrun that prints its arguments ----


@pytest.fixture
def echo_torchrun(tmp_path) -> Path:
    path = tmp_path / "echo-torchrun"
    path.write_text('#!/bin/sh\necho "TORCHRUN $*"\n')
    path.chmod(0o755)
    return path


def torchrun_call(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if line.startswith("TORCHRUN ")]
    assert len(lines) == 1, out
    return lines[0].split()[1:]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multinode_script_defaults_to_one_local_node(echo_torchrun):
    env = launch_env(TORCHRUN=str(echo_torchrun), NPROC_PER_NODE="3")
    rc, out = run(["bash", str(MULTINODE), "configs/tiny-cpu.yaml", "train.steps=2", "--resume", "auto"], env)
    assert_ok(rc, out)
    assert torchrun_call(out) == ["--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "3",
                                  "--master_addr", "127.0.0.1", "--master_port", "29500", "-m", "pretrain", "train",
                                  "configs/tiny-cpu.yaml", "train.steps=2", "--resume", "auto"]


def test_multinode_script_needs_master_addr_for_several_nodes(echo_torchrun):
    rc, out = run(["bash", str(MULTINODE), "configs/tiny-cpu.yaml"], launch_env(TORCHRUN=str(echo_torchrun),
                                                                                NNODES="2", NODE_RANK="1"))
    assert rc != 0
    assert "MASTER_ADDR" in out and "TORCHRUN" not in out


def slurm_env(tmp_path: Path, echo_torchrun: Path, with_scontrol: bool, **slurm: str) -> dict[str, str]:
    """A PATH of the system tools minus any real scontrol (plus a fake one if asked), so only ours can answer."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    for system_dir in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(system_dir).glob("*") if Path(system_dir).is_dir() else ():
            link = bin_dir / tool.name
            if tool.name != "scontrol" and not link.exists():
                link.symlink_to(tool)
    if with_scontrol:
        (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] || exit 1\n'
                                          "echo gpu07\necho gpu08\n")
        (bin_dir / "scontrol").chmod(0o755)
    return launch_env(TORCHRUN=str(echo_torchrun), PATH=str(bin_dir), **slurm)


def test_slurm_node_script_derives_rendezvous_from_slurm(tmp_path, echo_torchrun):
    env = slurm_env(tmp_path, echo_torchrun, True, SLURM_NNODES="2", SLURM_NODEID="1", SLURM_PROCID="1",
                    SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="1234567", SLURM_GPUS_PER_NODE="h100:4")
    rc, out = run(["bash", str(SLURM_NODE), "configs/tiny-cpu.yaml", "parallel.strategy=fsdp2"], env)
    assert_ok(rc, out)
    argv = torchrun_call(out)
    assert [option(argv, k) for k in ("--nnodes", "--node_rank", "--nproc_per_node", "--master_addr",
                                      "--master_port")] == ["2", "1", "4", "gpu07", str(20000 + 1234567 % 10000)]
    assert argv[-5:] == ["-m", "pretrain", "train", "configs/tiny-cpu.yaml", "parallel.strategy=fsdp2"]


def test_slurm_node_script_overrides_and_plain_hostname_without_scontrol(tmp_path, echo_torchrun):
    env = slurm_env(tmp_path, echo_torchrun, False, SLURM_JOB_NUM_NODES="1", SLURM_PROCID="0",
                    SLURM_JOB_NODELIST="gpu07", SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="8", MASTER_PORT="31000")
    rc, out = run(["bash", str(SLURM_NODE), "configs/tiny-cpu.yaml"], env)
    assert_ok(rc, out)
    argv = torchrun_call(out)
    assert [option(argv, k) for k in ("--nnodes", "--node_rank", "--nproc_per_node", "--master_addr",
                                      "--master_port")] == ["1", "0", "8", "gpu07", "31000"]


def test_slurm_node_script_refuses_a_compressed_nodelist_without_scontrol(tmp_path, echo_torchrun):
    env = slurm_env(tmp_path, echo_torchrun, False, SLURM_NNODES="2", SLURM_NODEID="0",
                    SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="42")
    rc, out = run(["bash", str(SLURM_NODE), "configs/tiny-cpu.yaml"], env)
    assert rc != 0
    assert "MASTER_ADDR" in out and "TORCHRUN" not in out


def test_sbatch_script_runs_node_script_once_per_node():
    text = SLURM_BATCH.read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in directives
    assert any(d.startswith("--nodes=") for d in directives)
    assert any(d.startswith("--gpus-per-node=") for d in directives)
    assert "--signal=TERM@120" in directives  # a stop notice before the time limit: the run checkpoints
    assert 'srun --kill-on-bad-exit=1 bash launch/slurm/node.sh "$@"' in text


def test_sbatch_script_launches_through_pretrain_launch_with_the_projects_python(tmp_path):
    """node.sh's default launcher (`$PYTHON -m pretrain.launch`) with the submit dir's venv, not a bare torchrun."""
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (submit / ".venv" / "bin" / "python").chmod(0o755)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\necho "PYTHON=${PYTHON:-} TORCHRUN=${TORCHRUN:-} ARGS=$*"\n')
    (fake / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TORCHRUN")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_SUBMIT_DIR=str(submit))
    out = subprocess.run(["bash", str(SLURM_BATCH), "configs/tiny-cpu.yaml", "train.steps=2"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"PYTHON={submit}/.venv/bin/python TORCHRUN= ARGS=--kill-on-bad-exit=1 bash "
                                  "launch/slurm/node.sh configs/tiny-cpu.yaml train.steps=2")
    env["TORCHRUN"] = "/opt/torchrun"  # the caller's choice wins
    out = subprocess.run(["bash", str(SLURM_BATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("PYTHON= TORCHRUN=/opt/torchrun "), out.stdout


@pytest.mark.parametrize("script", [MULTINODE, SLURM_NODE, SLURM_BATCH], ids=lambda p: p.name)
def test_scripts_are_strict_bash(script):
    # (shellcheck -x was clean on all three when written; it is not a project dependency, so not run here.)
    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0


@pytest.mark.parametrize("name,kind,machines", [("single-gpu", "NO", 1), ("multi-gpu", "MULTI_GPU", 1),
                                                 ("multi-node", "MULTI_GPU", 2)])
def test_accelerate_configs_are_plain_multi_process_launches(name, kind, machines):
    """accelerate reads them, and none enables its FSDP / DeepSpeed plugin or mixed precision (pretrain owns those)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert (cfg.distributed_type.value, cfg.num_machines, cfg.mixed_precision) == (kind, machines, "no")
    assert not cfg.fsdp_config and not cfg.deepspeed_config
    assert "-m pretrain train" in path.read_text()
