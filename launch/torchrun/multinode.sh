#!/usr/bin/env bash
# Train on one or several nodes with torchrun: run this script ONCE ON EVERY NODE, from the
# repository root, with the same arguments (a recipe and overrides) everywhere:
#
#   # node 0 (its address is MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 \
#       bash launch/torchrun/multinode.sh configs/gpt2-124m.yaml parallel.strategy=fsdp2 parallel.world_size=16
#   # node 1:
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 \
#       bash launch/torchrun/multinode.sh configs/gpt2-124m.yaml parallel.strategy=fsdp2 parallel.world_size=16
#
# Environment (defaults: a single node on this machine):
#   NNODES          number of nodes (1)
#   NODE_RANK       this node's index, 0 .. NNODES-1; node 0 hosts the rendezvous (0)
#   MASTER_ADDR     an address of node 0 that every node can reach (127.0.0.1; required if NNODES > 1)
#   MASTER_PORT     a free TCP port on node 0 (29500)
#   NPROC_PER_NODE  processes on this node, one per GPU (the GPUs nvidia-smi lists, else 1)
#   TORCHRUN        a torchrun to use instead of the default `$PYTHON -m pretrain.launch` (torchrun's own
#                   arguments, minus its traceback after the run's one-line error), e.g. .venv/bin/torchrun
#   PYTHON          the interpreter of the default launcher (python3), e.g. .venv/bin/python
# The distributed strategy lives in the run config (parallel.strategy); torchrun only starts
# processes. Add parallel.world_size=NNODES*NPROC_PER_NODE so that a wrong launch is refused.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -n "${TORCHRUN:-}" ]]; then
    launcher=("$TORCHRUN")
else
    launcher=("${PYTHON:-python3}" -m pretrain.launch)
fi

if [[ -z "${MASTER_ADDR:-}" ]]; then
    # A loopback default would make each node rendezvous with itself and hang; refuse instead.
    if (( NNODES > 1 )); then
        echo "multinode.sh: NNODES=$NNODES needs MASTER_ADDR (an address of node 0 that every node can reach)" >&2
        exit 2
    fi
    MASTER_ADDR=127.0.0.1
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    # One process per GPU; nvidia-smi may be missing or fail (no driver): then a single process.
    NPROC_PER_NODE="$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU' || true)"
    if (( NPROC_PER_NODE < 1 )); then
        NPROC_PER_NODE=1
    fi
fi

# Static rendezvous: ranks are laid out by NODE_RANK (node 0 holds ranks 0 .. NPROC_PER_NODE-1),
# so rank 0, which writes the run directory, is always on node 0.
exec "${launcher[@]}" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    -m pretrain train "$@"
