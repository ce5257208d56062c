"""torchrun restarts: each generation of worker processes meets under keys of its own.

Since torch 2.5 torchrun's agents host one TCP store for their workers and keep it for the whole
job (`TORCHELASTIC_USE_AGENT_STORE=True`; the static rendezvous of `--master-addr` always has).
`init_process_group("env://")` has every process publish its address under the same keys in it
(`default_pg/0/...`) in every generation, so after a restart a process that reads a peer's key
before the peer has rewritten it gets the address of a killed process: gloo then fails with
"Connection refused", or both processes hang in `init_process_group` (NCCL reads a stale unique
id the same way: pytorch/pytorch#135712, #167288). `TORCHELASTIC_RESTART_COUNT` cannot name a
generation: on several nodes only the agent whose worker failed counts the restart.

So under a shared agent store the processes first agree on a token that no earlier generation
had (`generation_token`) and build the process group under a key prefix made from it
(`init_generation_group`, which `trainers.GenerationDDPStrategy` calls). The agents stop every
process of a generation before they start the next one, so nothing writes old keys meanwhile.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

from fmnist_lightning.errors import FmnistError

KEYS = "fmnist/generation"
POLL_S = 0.02  # how often rank 0 looks for the other ranks' answers
ASK_AGAIN_S = 1.0  # how long another rank waits for rank 0's confirmation before it reads the token again


def shares_agent_store() -> bool:
    """Whether torchrun's agent hosts this job's store and keeps it across restarts."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def generation_token(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> str:
    """A token that every process of this generation gets and no earlier generation had.

    Rank 0 makes a new token and publishes it. Any other rank cannot tell it from a previous
    generation's by reading it, so it answers with the token it read and a nonce of its own,
    and trusts the token only when rank 0 confirms under that nonce, which no earlier process
    can have written. Rank 0 confirms only answers that carry its own token."""
    if world_size == 1:
        return uuid.uuid4().hex
    deadline = time.monotonic() + timeout.total_seconds()
    return _lead(store, world_size, deadline) if rank == 0 else _follow(store, rank, deadline)


def _lead(store: dist.Store, world_size: int, deadline: float) -> str:
    token = uuid.uuid4().hex
    store.set(f"{KEYS}/token", token)
    waiting = set(range(1, world_size))
    while waiting:
        for rank in sorted(waiting):
            answer = f"{KEYS}/answer/{rank}"
            if not store.check([answer]):
                continue
            seen, _, nonce = store.get(answer).decode().partition(" ")
            if seen == token:
                store.set(f"{KEYS}/confirmed/{nonce}", token)
                waiting.discard(rank)
        if waiting:
            _wait_or_fail(deadline, f"rank(s) {sorted(waiting)} did not answer")
            time.sleep(POLL_S)
    return token


def _follow(store: dist.Store, rank: int, deadline: float) -> str:
    nonce = uuid.uuid4().hex
    while True:
        token = store.get(f"{KEYS}/token").decode()  # this generation's, or a stale one
        store.set(f"{KEYS}/answer/{rank}", f"{token} {nonce}")
        try:
            store.wait([f"{KEYS}/confirmed/{nonce}"], timedelta(seconds=ASK_AGAIN_S))
            return token
        except dist.DistStoreError:  # not confirmed yet: the token was stale, or rank 0 is slow
            _wait_or_fail(deadline, "rank 0 did not confirm this process")


def _wait_or_fail(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise FmnistError(f"the processes of this torchrun job did not all meet: {what}")


def init_generation_group(
    backend: str, rank: int, world_size: int, timeout: timedelta, device_id: torch.device | None = None
) -> None:
    """The default process group, built in the agent's store under this generation's own prefix."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    token = generation_token(store, rank, world_size, timeout)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"fmnist/{token}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device_id,
    )
