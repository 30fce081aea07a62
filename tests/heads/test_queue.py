import pytest
import torch

from broadface.heads import EmbeddingQueue


def _push(q, start, n, dim=3):
    e = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim) + 1
    q.push(e, torch.arange(start, start + n) % 5, torch.ones(n, dim), ids=torch.arange(start, start + n))
    return e


def test_fifo_order_fill_and_wraparound():
    q = EmbeddingQueue(5, 3, storage="full", track_ids=True)
    _push(q, 0, 3)
    assert len(q) == 3 and q.ptr == 3
    assert q.entries().ids.tolist() == [0, 1, 2]
    _push(q, 3, 4)  # wraps: 0, 1 are dropped
    assert len(q) == 5 and q.ptr == 2
    assert q.entries().ids.tolist() == [2, 3, 4, 5, 6] and q.ids[q.order()].tolist() == [2, 3, 4, 5, 6]
    assert q.entries().steps.tolist() == [0, 1, 1, 1, 1]
    assert q.entries().vectors[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]  # e⁻ = index + 1
    _push(q, 7, 12)  # more than the queue holds: only the newest 5 survive
    assert q.entries().ids.tolist() == [14, 15, 16, 17, 18]


def test_entries_are_a_copy_and_load_round_trips():
    q = EmbeddingQueue(5, 3, storage="full", track_ids=True)
    _push(q, 0, 7)  # wrapped
    ent = q.entries()
    ent.labels.fill_(4)  # writing to the view never reaches the queue
    assert q.entries().labels.tolist() == [2, 3, 4, 0, 1]
    r = EmbeddingQueue(8, 3, storage="full", track_ids=True)
    r.load(q.entries(), step=q.step)
    assert (r.ptr, r.fill, r.step) == (5, 5, 1)
    for name, value in q.entries().tensors().items():
        assert torch.equal(getattr(r.entries(), name), value), name
    with pytest.raises(ValueError, match="room for 3"):
        EmbeddingQueue(3, 3, storage="full").load(q.entries())
    small = EmbeddingQueue(3, 3, storage="full")
    small.load(q.entries(), drop_oldest=True)
    assert small.entries().labels.tolist() == [4, 0, 1] and small.ptr == 0


def test_keep_false_leaves_the_contents():
    q = EmbeddingQueue(4, 3, storage="full")
    _push(q, 0, 2)
    before = q.vectors.clone()
    q.push(torch.full((2, 3), float("nan")), torch.tensor([1, 1]), torch.ones(2, 3), keep=torch.tensor(False))
    assert torch.equal(q.vectors, before) and q.fill == 4 and q.step == 2  # counters move, contents do not
    q.push(torch.full((1, 3), 9.0), torch.tensor([1]), torch.ones(1, 3), keep=torch.tensor(True))
    assert not torch.equal(q.vectors, before)


def test_hand_computed_compensation():
    q = EmbeddingQueue(4, 2, storage="compact")
    q.push(torch.tensor([[3.0, 4.0]]), torch.tensor([1]), torch.tensor([[1.0, 0.0]]))
    w_now = torch.tensor([[9.0, 9.0], [1.0, 1.0]])
    # λ = ‖e⁻‖/‖W⁻_y‖ = 5; e* = e⁻ + λ(W_y − W⁻_y) = [3,4] + 5·[0,1] = [3,9]
    assert torch.allclose(q.compensated(w_now), torch.tensor([[3.0, 9.0]]))
    assert q.scales[0].item() == pytest.approx(5.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compact_equals_full_storage(dtype, tol):
    torch.manual_seed(0)
    full, compact = EmbeddingQueue(10, 6, "full"), EmbeddingQueue(10, 6, "compact", dtype=dtype)
    w = torch.randn(4, 6)
    for _ in range(4):  # 12 entries: wraps
        e, y = torch.randn(3, 6), torch.randint(0, 4, (3,))
        for q in (full, compact):
            q.push(e, y, w[y])
        w = w + 0.1 * torch.randn_like(w)
    a, b = full.compensated(w), compact.compensated(w)
    assert torch.allclose(a, b, atol=tol * a.abs().max().item())


@pytest.mark.parametrize("size,dim", [(64, 16), (1024, 64)])
def test_compact_stores_d_plus_two_numbers_per_entry(size, dim):
    """u, λ and the label, nothing else (no hidden diagnostic rows), whatever the queue size."""
    q = EmbeddingQueue(size, dim, "compact")
    assert sum(b.numel() for b in q.buffers()) == size * (dim + 2)
    assert sum(b.numel() for b in EmbeddingQueue(size, dim, "full").buffers()) == size * (2 * dim + 2)


def test_no_compensation_keeps_past_embedding():
    q = EmbeddingQueue(4, 2, compensate=False)
    q.push(torch.tensor([[3.0, 4.0]]), torch.tensor([0]), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(q.compensated(torch.tensor([[5.0, 5.0]])), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(q.uncompensated(), torch.tensor([[3.0, 4.0]]))


@pytest.mark.parametrize("pushes", [2, 5])  # mid-fill and after wrap
def test_state_dict_round_trip(pushes):
    torch.manual_seed(0)
    q = EmbeddingQueue(7, 3, track_ids=True)
    for i in range(pushes):
        _push(q, 3 * i, 3)
    r = EmbeddingQueue(7, 3, track_ids=True)
    r.load_state_dict(q.state_dict())
    for name, buf in q.named_buffers():
        assert torch.equal(buf, dict(r.named_buffers())[name]), name
    assert (r.ptr, r.fill, r.step) == (q.ptr, q.fill, q.step) == ((3 * pushes) % 7, min(3 * pushes, 7), pushes)
    w = torch.randn(5, 3)
    _push(q, 100, 2), _push(r, 100, 2)
    assert torch.equal(q.compensated(w), r.compensated(w))


def test_state_that_does_not_fit_is_refused():
    q = EmbeddingQueue(7, 3)
    with pytest.raises(ValueError, match="does not fit a queue of 7"):
        q.set_extra_state({"ptr": 0, "fill": 9, "step": 1})


def test_bad_arguments():
    with pytest.raises(ValueError, match="storage"):
        EmbeddingQueue(4, 2, storage="dense")
    with pytest.raises(ValueError, match="size"):
        EmbeddingQueue(-1, 2)
    with pytest.raises(RuntimeError, match="full"):
        EmbeddingQueue(4, 2).uncompensated()
