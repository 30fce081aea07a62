"""Sharded-head checkpoints reload on another number of ranks (2→1, 1→2) and training continues identically."""
import functools

import pytest
import torch

from broadface.dist import rank_slice
from broadface.heads import ArcFace, BroadFace, QueueEntries, ShardedBroadFace, ShardedMarginHead, merge_head_states
from broadface.heads.partition import class_range, merge_fifo, split_fifo
from broadface.heads.queue import entries_from_state
from tests.helpers import spawn

C, D, N, Q, WORLD = 13, 6, 6, 6, 2  # Q per rank; one rank holds WORLD*Q
MODES = ("local", "replicated")


def make_head(mode, world=WORLD, queue=Q, classes=C, dim=D):
    return ShardedBroadFace(functools.partial(ArcFace, scale=16.0), classes, dim, queue_size=queue * WORLD // world,
                            queue_mode=mode, chunk_size=5, init_seed=3)


def batches(first, count):
    g = torch.Generator().manual_seed(11)
    all_ = [(torch.randn(N, D, generator=g) * 3, torch.randint(0, C, (N,), generator=g)) for _ in range(first + count)]
    return all_[first:]


def train(head, first, count, rank=0, world=1):
    """SGD on W over global batches [first, first+count); returns the global losses."""
    out = []
    for e, y in batches(first, count):
        part = rank_slice(N, world, rank)
        head.zero_grad()
        loss = head(e[part], y[part])
        loss.backward()
        out += [loss.item(), head.stats.union_loss.item()]
        with torch.no_grad():
            head.weight.sub_(2.0 * head.weight.grad)
    return out


def _worker(rank, world, tmp):
    for mode in MODES:
        head = make_head(mode)  # 2 → 1: train 4 steps (queue wrapped), save both forms, go on 3 steps
        train(head, 0, 4, rank, world)
        full = head.checkpoint_state()
        rows = head.partition.gather_rows(head.weight * 2)  # e.g. a momentum buffer of the shard
        assert rows is None if rank else torch.equal(rows, full["margin.weight"] * 2)
        p = head.partition
        assert torch.equal(p.local_rows(torch.arange(C)), torch.arange(p.class_start, p.class_stop))
        torch.save(head.state_dict(), tmp / f"{mode}.state.{rank}.pt")
        if rank == 0:
            torch.save(full, tmp / f"{mode}.full2.pt")
        losses = train(head, 4, 3, rank, world)
        end = head.checkpoint_state()
        if rank == 0:
            torch.save((losses, end), tmp / f"{mode}.cont2.pt")
        head = make_head(mode)  # 1 → 2: continue from the single-process checkpoint
        head.load_checkpoint_state(torch.load(tmp / f"{mode}.full1.pt", weights_only=True))
        losses = train(head, 4, 3, rank, world)
        end = head.checkpoint_state()
        if rank == 0:
            torch.save((losses, end), tmp / f"{mode}.cont1to2.pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    singles = {}
    for mode in MODES:  # the single-process run that 1 → 2 starts from
        head = make_head(mode, world=1)
        train(head, 0, 4)
        torch.save(head.checkpoint_state(), tmp / f"{mode}.full1.pt")
        singles[mode] = head
    spawn(_worker, WORLD, tmp)
    return tmp, singles


def same_state(a, b, atol=1e-6):
    """Same W and the same queue entries (as a set: the FIFO order of a local queue depends on the
    world it was filled on; eviction order is checked by the continued losses)."""
    assert torch.allclose(a["margin.weight"], b["margin.weight"], atol=atol, rtol=1e-5)
    (ea, _, _), (eb, _, _) = entries_from_state(a), entries_from_state(b)
    ia, ib = ea.scales.argsort(), eb.scales.argsort()
    for k in ("vectors", "scales"):
        assert torch.allclose(getattr(ea, k)[ia].float(), getattr(eb, k)[ib].float(), atol=atol, rtol=1e-5), k
    assert torch.equal(ea.labels[ia], eb.labels[ib]) and len(ea) == WORLD * Q


@pytest.mark.parametrize("mode", MODES)
def test_two_to_one_continues_identically(run, mode):
    tmp, _ = run
    head = make_head(mode, world=1)
    head.load_checkpoint_state(torch.load(tmp / f"{mode}.full2.pt", weights_only=True))
    losses = train(head, 4, 3)
    ref_losses, ref_end = torch.load(tmp / f"{mode}.cont2.pt", weights_only=True)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    same_state(head.checkpoint_state(), ref_end)


@pytest.mark.parametrize("mode", MODES)
def test_one_to_two_continues_identically(run, mode):
    tmp, singles = run
    losses = train(singles[mode], 4, 3)
    got_losses, got_end = torch.load(tmp / f"{mode}.cont1to2.pt", weights_only=True)
    assert got_losses == pytest.approx(losses, rel=1e-5)
    same_state(got_end, singles[mode].checkpoint_state())


@pytest.mark.parametrize("mode", MODES)
def test_per_rank_files_merge_to_the_gathered_state(run, mode):
    tmp, _ = run
    states = [torch.load(tmp / f"{mode}.state.{r}.pt", weights_only=True) for r in (1, 0)]  # any order
    merged, gathered = merge_head_states(states), torch.load(tmp / f"{mode}.full2.pt", weights_only=True)
    assert set(merged) == set(gathered)
    for k in merged:
        assert (merged[k] == gathered[k]) if not isinstance(merged[k], torch.Tensor) else torch.equal(merged[k],
                                                                                                     gathered[k]), k
    assert merged["queue._extra_state"]["fill"] == WORLD * Q


def test_mismatches_are_clear_errors(run):
    tmp, _ = run
    states = [torch.load(tmp / f"local.state.{r}.pt", weights_only=True) for r in range(WORLD)]
    full = torch.load(tmp / "local.full2.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"missing rank\(s\) \[1\]"):
        merge_head_states(states[:1])
    with pytest.raises(ValueError, match="duplicate"):
        merge_head_states([states[0], states[0]])
    with pytest.raises(ValueError, match="re-shard"):  # a 2-rank shard into a 1-rank head: refused before copying
        make_head("local", world=1).load_state_dict(states[1])
    with pytest.raises(ValueError, match=r"classifier has shape \(13, 6\).*needs \(14, 6\)"):
        make_head("local", world=1, classes=14).load_checkpoint_state(full)
    with pytest.raises(ValueError, match=r"classifier has shape \(13, 6\).*needs \(13, 8\)"):
        make_head("local", world=1, dim=8).load_checkpoint_state(full)
    with pytest.raises(ValueError, match="not a BroadFace"):
        make_head("local", world=1).load_checkpoint_state({"weight_of": full["margin.weight"]})
    with pytest.raises(ValueError, match="room for 6"):
        make_head("local", world=1, queue=3).load_checkpoint_state(full)  # 12 entries, 6 slots
    with pytest.raises(ValueError, match="room for 0"):
        ShardedMarginHead(ArcFace, C, D).load_checkpoint_state(full)
    small = make_head("local", world=1, queue=3)
    small.load_checkpoint_state(full, drop_oldest=True)  # FIFO: the newest 6 survive
    assert torch.equal(small.queue.entries().labels, full["queue.labels"][-6:])
    bad = dict(states[1], **{"margin.weight": states[1]["margin.weight"][:-1]})
    with pytest.raises(ValueError, match="rank 1/2 has 5 rows"):
        merge_head_states([states[0], bad])


def test_fifo_merge_split_round_trip_and_split_rule():
    entries = QueueEntries(torch.arange(10.0)[:, None].repeat(1, 3), torch.arange(10.0), torch.arange(10))
    for world in (1, 2, 3, 4):
        parts = split_fifo(entries, world)
        sizes = [len(p) for p in parts]
        assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1
        assert parts[-1].labels[-1] == 9  # the newest entry goes to the last rank
        back = merge_fifo(parts)
        assert all(torch.equal(getattr(back, k), getattr(entries, k)) for k in ("vectors", "scales", "labels"))
    assert [class_range(13, 2, r) for r in range(2)] == [(0, 7), (7, 13)]
    assert [class_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="every rank needs"):
        class_range(3, 4, 0)


def test_single_process_broadface_checkpoint_continues_on_a_sharded_head():
    torch.manual_seed(0)
    ref = BroadFace(ArcFace(C, D, scale=16.0), queue_size=WORLD * Q, chunk_size=5)
    train(ref, 0, 4)
    head = make_head("replicated", world=1)
    head.load_checkpoint_state(ref.state_dict())  # any one-process state_dict, wrapped ring included
    assert train(head, 4, 3) == pytest.approx(train(ref, 4, 3), rel=1e-5)
    assert torch.allclose(head.weight, ref.weight, atol=1e-6)
