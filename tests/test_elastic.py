"""torchrun restarts under the agents' shared store (fmnist_lightning/elastic.py): each generation of
processes agrees on a token of its own and builds its process group under it, so it never reads
the addresses a killed generation left in the store. The whole launch, killed and restarted, is in
tests/test_recovery.py::test_torchrun_restarts_the_group_and_it_resumes_by_itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from fmnist_lightning.elastic import generation_token
from fmnist_lightning.errors import FmnistError
from tests.helpers import ROOT, wait_until

TIMEOUT = timedelta(seconds=60)


def _agent_store() -> dist.TCPStore:
    """A store that outlives the processes using it, as torchrun's agent hosts one."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _client(store: dist.TCPStore) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=TIMEOUT)


def _meet(store: dist.TCPStore, world_size: int, first: int | None = None) -> list[str]:
    """The tokens that `world_size` processes (threads here) get, rank `first` starting a second early."""
    tokens: list[str] = [""] * world_size

    def rank(r: int) -> None:
        tokens[r] = generation_token(_client(store), r, world_size, TIMEOUT)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world_size)]
    for r in sorted(range(world_size), key=lambda r: r != first):
        threads[r].start()
        time.sleep(1.0 if r == first else 0)
    for thread in threads:
        thread.join(timeout=TIMEOUT.total_seconds())
    assert not any(thread.is_alive() for thread in threads), f"the ranks did not meet: {tokens}"
    return tokens


def test_each_generation_agrees_on_a_token_no_earlier_one_had() -> None:
    store = _agent_store()
    first = _meet(store, 3)
    assert len(set(first)) == 1
    # The next generation's ranks 1 and 2 start first and read the token the last one left.
    second = _meet(store, 3, first=1)
    assert len(set(second)) == 1 and second[0] != first[0]
    third = _meet(store, 3, first=0)
    assert len(set(third)) == 1 and third[0] not in (first[0], second[0])


def test_a_rank_whose_rank_0_never_comes_fails_instead_of_waiting_forever() -> None:
    store = _agent_store()
    _meet(store, 2)  # a previous generation's token and answers stay in the store
    started = time.monotonic()
    with pytest.raises(FmnistError, match="did not all meet: rank 0 did not confirm"):
        generation_token(_client(store), 1, 2, timedelta(seconds=2))
    assert time.monotonic() - started < 10
    # Nor does a rank 0 whose rank 1 never comes: it finds only the answer to an earlier token.
    with pytest.raises(FmnistError, match=r"did not all meet: rank\(s\) \[1\] did not answer"):
        generation_token(_client(store), 0, 2, timedelta(seconds=2))


# One process of a generation, as torchrun starts it: it builds the process group through the
# agent's store, sums a tensor over the group, and writes the sum where the test looks for it.
WORKER = """
import os, sys, time
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
from fmnist_lightning.elastic import init_generation_group

rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
init_generation_group("gloo", rank, world_size, timedelta(seconds=60))
total = torch.ones(1)
dist.all_reduce(total)
Path(sys.argv[1], f"rank{rank}").write_text(str(int(total.item())))
time.sleep(float(sys.argv[2]))  # the first generation stays until it is killed
"""


@pytest.mark.parametrize("first", [0, 1], ids=["rank-0-starts-first", "rank-1-starts-first"])
def test_a_new_generation_connects_through_the_store_a_killed_one_left(tmp_path: Path, first: int) -> None:
    """Two generations of two processes on one store, the first killed with SIGKILL. Before
    elastic.py, with init_process_group("env://"), the second failed with "Connection refused"
    when its rank 1 started first, and hung when its rank 0 did (its peer's address was the dead
    process's)."""
    store = _agent_store()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}  # fmt: skip

    def generation(folder: Path, order: list[int], stay_s: float) -> list[subprocess.Popen[str]]:
        folder.mkdir()
        procs = {}
        for rank in order:
            args = [sys.executable, "-c", WORKER, str(folder), str(stay_s)]
            procs[rank] = subprocess.Popen(args, env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
            time.sleep(2.0 if rank == order[0] else 0)  # the other rank reads the store before this one writes
        return [procs[0], procs[1]]

    old = generation(tmp_path / "first", [0, 1], stay_s=600)
    try:
        wait_until(lambda: all((tmp_path / "first" / f"rank{r}").exists() for r in (0, 1)), 120, "the first group")
    finally:
        for p in old:
            p.kill()
            p.wait(timeout=60)
    new = generation(tmp_path / "second", [first, 1 - first], stay_s=0)
    try:
        for p in new:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in new:
            p.kill()
            p.wait(timeout=60)
    assert [(tmp_path / "second" / f"rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
