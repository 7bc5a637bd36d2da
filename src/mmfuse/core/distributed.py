"""Which process of a multi-process run this is, known before any process group exists.

Under DDP every rank runs the whole command: Lightning's launcher starts the other local ranks as
copies of it (``LOCAL_RANK`` set), torchrun and SLURM start every rank themselves (``RANK``,
``SLURM_PROCID``). Work that must happen once per run (clearing an earlier run's files, writing the
model folder, metrics, tables and plots, printing results) asks ``is_rank_zero``; once the trainer
exists, its ``is_global_zero`` says the same.
"""

from __future__ import annotations

import os

import torch


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (0 in a single-process run)."""
    if os.environ.get("RANK", "").isdigit():  # torchrun, and Lightning once the group is set up
        return int(os.environ["RANK"])
    ntasks = os.environ.get("SLURM_NTASKS", "1")
    if ntasks.isdigit() and int(ntasks) > 1 and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])  # srun with several tasks
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    if node.isdigit() and local.isdigit() and (int(node) or int(local)):
        return max(1, int(local))  # a rank Lightning's launcher started; its exact number does not matter here
    return 0


def is_rank_zero() -> bool:
    """True in the one process that writes a run's files (the group's rank 0 once it exists)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return launch_rank() == 0
