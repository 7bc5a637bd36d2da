#!/usr/bin/env bash
# One machine with 4 GPUs, or 2 machines with 4 GPUs each, training one model with DDP.
# torchrun starts every process; Lightning sees its environment and joins them (no second launcher).
# devices and num_nodes must match what torchrun starts: --nproc-per-node and --nnodes.
set -euo pipefail
CONFIG=${CONFIG:-configs/synthetic.yaml}
NODES=${NODES:-1}            # machines
GPUS=${GPUS:-4}              # processes (GPUs) per machine
MASTER=${MASTER:-127.0.0.1}  # address of the machine with node rank 0, reachable from the others
NODE_RANK=${NODE_RANK:-0}    # 0 on the first machine, 1 on the second, ...

torchrun --nnodes "$NODES" --nproc-per-node "$GPUS" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER" --master-port 29500 \
  "$(command -v mmfuse)" train "$CONFIG" --out runs/ddp \
  --set trainer.accelerator=gpu --set trainer.devices="$GPUS" --set trainer.num_nodes="$NODES" \
  --set trainer.strategy=ddp --set trainer.precision=bf16
