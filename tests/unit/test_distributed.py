"""The pieces of distributed training that need no process group: sharding, the global-batch
sampler, seeds, the environment parsing and the single-process fallbacks."""
import numpy as np
import pytest

from uts_cli import distributed
from uts_cli.data import BalancedBatchSampler
from uts_cli.errors import InputDataError, UsageError


# -- shard_by_size ---------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_by_size_covers_every_item_once(world):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, size=37).astype(float)
    parts = [distributed.shard_by_size(sizes, world, r) for r in range(world)]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(sizes)))
    for p in parts:
        assert p == sorted(p)


def test_shard_by_size_balances_load_and_is_deterministic():
    rng = np.random.default_rng(1)
    sizes = rng.lognormal(10, 1, size=200)
    parts = [distributed.shard_by_size(sizes, 4, r) for r in range(4)]
    loads = np.array([sizes[p].sum() for p in parts])
    # Greedy largest-first: no rank exceeds the mean by more than the largest item.
    assert loads.max() - loads.mean() <= sizes.max()
    assert loads.max() / loads.min() < 1.05
    assert parts == [distributed.shard_by_size(list(sizes), 4, r) for r in range(4)]


def test_shard_by_size_small_cases():
    # One big slide and three small ones over two ranks: the big one alone on rank 0.
    assert distributed.shard_by_size([10, 1, 1, 1], 2, 0) == [0]
    assert distributed.shard_by_size([10, 1, 1, 1], 2, 1) == [1, 2, 3]
    # Ties keep input order and go to the lower rank first.
    assert distributed.shard_by_size([5, 5, 5], 2, 0) == [0, 2]
    # More ranks than items: the extra ranks get nothing.
    assert distributed.shard_by_size([3, 2], 4, 3) == []
    assert distributed.shard_by_size([], 3, 1) == []


def test_shard_by_size_rejects_bad_input():
    with pytest.raises(ValueError):
        distributed.shard_by_size([1, 2], 2, 2)
    with pytest.raises(ValueError):
        distributed.shard_by_size([1, -2], 2, 0)
    with pytest.raises(ValueError):
        distributed.shard_by_size([1, float("nan")], 2, 0)


def test_shard_strided():
    parts = [distributed.shard_strided(10, 3, r) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError):
        distributed.shard_strided(10, 0, 0)


# -- the sampler in distributed mode ------------------------------------------------------

def _labels(n=50, pos=7):
    lab = np.zeros(n)
    lab[:pos] = 1
    return lab


@pytest.mark.parametrize("world,batch,epoch_len", [(2, 8, None), (3, 8, None), (4, 10, 63), (2, 6, 37)])
def test_rank_slices_make_the_single_process_batches(world, batch, epoch_len):
    single = BalancedBatchSampler(_labels(), batch, seed=3, epoch_len=epoch_len)
    ranks = [BalancedBatchSampler(_labels(), batch, seed=3, epoch_len=epoch_len, rank=r, world_size=world)
             for r in range(world)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    ref = list(single)
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(s) for p, s in zip(per_rank, ranks))
    n_steps = len(per_rank[0])
    # The last small global batch may be dropped in distributed mode; everything before it matches.
    assert n_steps in (len(ref), len(ref) - 1)
    for step in range(n_steps):
        joined = [i for r in range(world) for i in per_rank[r][step]]
        assert joined == ref[step]
        assert min(len(per_rank[r][step]) for r in range(world)) >= 2
        assert ranks[0].global_batch_sizes()[step] == len(ref[step])


def test_skip_batches_counts_global_batches():
    full = BalancedBatchSampler(_labels(), 8, seed=1, rank=1, world_size=2)
    full.set_epoch(1)
    part = BalancedBatchSampler(_labels(), 8, seed=1, rank=1, world_size=2)
    part.set_epoch(1, skip_batches=2)
    assert list(part) == list(full)[2:]
    assert len(part.global_batch_sizes()) == len(part)
    # A run resumed with another world size picks up at the same global batch.
    single = BalancedBatchSampler(_labels(), 8, seed=1)
    single.set_epoch(1, skip_batches=2)
    r0 = BalancedBatchSampler(_labels(), 8, seed=1, rank=0, world_size=2)
    r0.set_epoch(1, skip_batches=2)
    assert [a + b for a, b in zip(r0, part)] == list(single)[: len(part)]


def test_global_batch_must_give_two_samples_per_rank():
    with pytest.raises(UsageError, match="global batch"):
        BalancedBatchSampler(_labels(), 5, world_size=4)


def test_single_process_sampler_unchanged():
    s = BalancedBatchSampler(_labels(n=17, pos=4), 4, seed=0, balance=False)
    s.set_epoch(1)
    sizes = [len(b) for b in s]
    assert sizes == [4, 4, 4, 4]  # 17 = 4*4 + 1: the lone last sample is dropped
    assert s.global_batch_sizes() == sizes


# -- seeds, environment, fallbacks -------------------------------------------------------------

def test_rank_seed():
    assert distributed.rank_seed(7, 0) == 7
    seeds = {distributed.rank_seed(7, r, s) for r in range(4) for s in (0, 100)}
    assert len(seeds) == 8
    assert distributed.rank_seed(7, 2, 5) == distributed.rank_seed(7, 2, 5)


def test_env_context(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_context() == distributed.SINGLE
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (3, 4, 1, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="inconsistent"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UsageError, match="integers"):
        distributed.env_context()


def test_cuda_index_refused_under_torchrun():
    ctx = distributed.DistContext(rank=1, world_size=2, local_rank=1)
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        distributed.rank_device("cuda:1", ctx)
    assert distributed.rank_device("cpu", ctx).type == "cpu"


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed._timeout().total_seconds() == 90
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match=distributed.TIMEOUT_ENV):
        distributed._timeout()


def test_single_process_fallbacks():
    import torch

    assert not distributed.current().enabled
    with distributed.session("cpu") as (ctx, device):
        assert ctx == distributed.SINGLE and device.type == "cpu"
        assert distributed.on_main(lambda: 5) == 5
        assert distributed.broadcast_object({"a": 1}) == {"a": 1}
        assert distributed.all_gather_object(3) == [3]
        assert distributed.all_reduce_sum([1, 2.5], device) == [1.0, 2.5]
        vote = distributed.StopVote(device)
        assert vote.vote(False) is False and vote.vote(True) is True and vote.settle(False) is False
        model = torch.nn.Linear(2, 2)
        assert distributed.wrap_model(model, device) is model
        distributed.barrier()
    with pytest.raises(InputDataError):
        distributed.on_main(lambda: (_ for _ in ()).throw(InputDataError("x")))


def test_peer_failure_classification():
    assert distributed.is_peer_failure(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"))
    assert not distributed.is_peer_failure(ValueError("bad value"))
    err = distributed.peer_lost(RuntimeError("Connection reset by peer\nmore"),
                                distributed.DistContext(rank=1, world_size=2))
    assert err.exit_code == 4 and "rank 1 of 2" in err.message and "--resume" in err.hint


def test_other_ranks_leave_shared_errors_to_rank_0(monkeypatch):
    from uts_cli.cli._output import _silent_rank
    from uts_cli.errors import ResourceError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _silent_rank(UsageError("x"))
    assert not _silent_rank(ResourceError("gpu gone"))
    monkeypatch.setenv("RANK", "0")
    assert not _silent_rank(UsageError("x"))
