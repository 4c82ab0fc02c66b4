#!/usr/bin/env bash
# One node's share of a SLURM training job: `srun` runs this once per node (train.sbatch does,
# with --ntasks-per-node=1); it works out the torchrun rendezvous from SLURM's environment and
# hands over to launch/torchrun/multinode.sh, which starts one training process per GPU.
#
#   srun bash launch/slurm/node.sh configs/gpt2-124m.yaml parallel.strategy=fsdp2
#
# Derived (each can be overridden by setting it before srun):
#   NNODES          SLURM_NNODES (or SLURM_JOB_NUM_NODES)
#   NODE_RANK       SLURM_NODEID (or SLURM_PROCID: the same with one task per node)
#   MASTER_ADDR     the first host of SLURM_JOB_NODELIST, via `scontrol show hostnames`
#   MASTER_PORT     20000 + SLURM_JOB_ID % 10000: the same on every node, and two jobs that
#                   share a node rarely collide
#   NPROC_PER_NODE  SLURM_GPUS_ON_NODE (or the count in SLURM_GPUS_PER_NODE), else 1
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

NNODES="${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}"

if [[ -z "${MASTER_ADDR:-}" ]]; then
    nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    if [[ -z "$nodelist" ]]; then
        echo "node.sh: SLURM_JOB_NODELIST is not set; run this under srun or set MASTER_ADDR" >&2
        exit 2
    fi
    if command -v scontrol >/dev/null 2>&1; then
        # scontrol expands the compressed form (node[01-04]); read it all rather than piping to
        # `head`, which could kill scontrol with SIGPIPE and fail the script under pipefail.
        mapfile -t hosts < <(scontrol show hostnames "$nodelist")
        MASTER_ADDR="${hosts[0]:-}"
    elif [[ "$nodelist" != *[\[\],]* ]]; then
        # Without scontrol only a single plain hostname can be read safely.
        MASTER_ADDR="$nodelist"
    fi
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "node.sh: cannot find the first host of SLURM_JOB_NODELIST=$nodelist (no scontrol?); set MASTER_ADDR" >&2
        exit 2
    fi
fi

if [[ -z "${MASTER_PORT:-}" ]]; then
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "node.sh: SLURM_JOB_ID is not set; run this under srun or set MASTER_PORT" >&2
        exit 2
    fi
    MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 10000 ))
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
        # --gpus-per-node may carry a type: "h100:8" -> 8.
        NPROC_PER_NODE="${SLURM_GPUS_PER_NODE##*:}"
    else
        NPROC_PER_NODE=1
    fi
fi

export NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE
echo "node.sh: node $NODE_RANK of $NNODES on ${HOSTNAME:-?}, $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
exec bash "$here/../torchrun/multinode.sh" "$@"
