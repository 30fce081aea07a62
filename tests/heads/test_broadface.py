import pytest
import torch

from broadface.heads import ArcFace, BroadFace, CosFace, chunked_margin_ce
from broadface.heads.queue import compensate

from .reference import NaiveBroadFace, assert_steps_match, dense_margin_loss

C, D, B = 13, 6, 5


def _head(**kw):
    """A head whose rows have the norms of a trained classifier (λ = ‖e⁻‖/‖W⁻_y‖ ≈ 1)."""
    torch.manual_seed(0)
    head = BroadFace(ArcFace(C, D, scale=16.0), **kw)
    with torch.no_grad():
        head.weight.normal_()
    return head


def _run(head, steps, seed=0, lr=0.5):
    """Drive the head like a trainer: random 'encoder outputs', SGD on W; return per-step grads."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        e = torch.randn(B, D, generator=g).requires_grad_(True)
        y = torch.randint(0, C, (B,), generator=g)
        head.zero_grad()
        loss = head(e, y)
        loss.backward()
        out.append((loss.detach(), e.grad.clone(), head.weight.grad.clone(), head.stats.as_dict()))
        with torch.no_grad():
            head.weight.sub_(lr * head.weight.grad)
    return out


@pytest.mark.parametrize("margin,m", [(ArcFace, (1.0, 0.5, 0.0)), (CosFace, (1.0, 0.0, 0.4))])
@pytest.mark.parametrize("compensate", [True, False])
def test_gradient_split_matches_equations(margin, m, compensate):
    """Encoder gets ∇L(X) (Eq. 8); W gets ∇L(X∪E*) (Eq. 9) with Eq. 7 compensation — over wrap-around."""
    torch.manual_seed(0)
    head = BroadFace(margin(C, D, scale=16.0), queue_size=12, compensate=compensate, chunk_size=4)
    with torch.no_grad():
        head.weight.normal_()
    ref = NaiveBroadFace(12, 16.0, *m, compensate=compensate)
    g = torch.Generator().manual_seed(1)
    batches = ((torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(6))
    assert_steps_match(head, ref, batches)  # 30 samples through a 12-entry queue
    assert head.stats.queue_fill == 12 and len(head.queue) == 12


def test_compensation_changes_the_classifier_gradient():
    a = _run(_head(queue_size=12, compensate=True), 4, lr=2.0)
    b = _run(_head(queue_size=12, compensate=False), 4, lr=2.0)
    assert torch.equal(a[0][2], b[0][2])  # empty queue: identical first step
    assert not torch.allclose(a[-1][2], b[-1][2])


def test_queue_size_zero_is_plain_margin_loss():
    torch.manual_seed(0)
    plain = ArcFace(C, D)
    head = BroadFace(ArcFace(C, D), queue_size=0)
    head.margin.load_state_dict(plain.state_dict())
    e = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    l1 = head(e, y)
    l1.backward()
    g1 = e.grad.clone()
    e.grad = None
    l2 = plain(e, y)
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(g1, e.grad)
    assert torch.equal(head.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_chunked_equals_unchunked(chunk):
    torch.manual_seed(0)
    w = torch.randn(C, D, requires_grad=True)
    f = torch.nn.functional.normalize(torch.randn(23, D), dim=1)
    y = torch.randint(0, C, (23,))
    head = ArcFace(C, D, scale=30.0)
    wn = torch.nn.functional.normalize(w, dim=1)
    loss = chunked_margin_ce(wn, f, y, head.target, 30.0, chunk)
    (g,) = torch.autograd.grad(loss, w)
    wr = w.detach().double().requires_grad_(True)
    ref = dense_margin_loss(f.double(), wr, y, 30.0, 1.0, 0.5, 0.0)
    (gr,) = torch.autograd.grad(ref, wr)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g.double(), gr, atol=1e-6, rtol=1e-4)


def test_compact_equals_full_storage_in_training():
    a = _run(_head(queue_size=12, storage="compact", chunk_size=5), 6, lr=2.0)
    b = _run(_head(queue_size=12, storage="full", chunk_size=100), 6, lr=2.0)
    for (la, ea, wa, sa), (lb, eb, wb, sb) in zip(a, b):
        assert torch.allclose(la, lb, rtol=1e-5) and torch.allclose(ea, eb, atol=1e-5, rtol=1e-4)
        assert torch.allclose(wa, wb, atol=1e-6, rtol=1e-4)
        assert sa["union_loss"] == pytest.approx(sb["union_loss"], rel=1e-5)
    assert a[-1][3]["compensation_norm"] is None  # compact storage keeps no W⁻_y: no norm, no hidden probe rows
    assert b[-1][3]["compensation_norm"] > 0


def test_compensation_norm_is_the_mean_distance_to_the_past_embedding():
    """Full storage: mean ‖e* − e⁻‖ over the queue, recomputed from the stored e⁻ and Eq. 7 by hand."""
    head = _head(queue_size=12, storage="full")
    _run(head, 3, lr=2.0)
    w = head.weight.detach()
    e_past, w_past, y = head.queue.vectors[:12], head.queue.past_weights[:12], head.queue.labels[:12]
    lam = e_past.norm(dim=1) / w_past.norm(dim=1)
    e_star = e_past + lam[:, None] * (w[y] - w_past)
    e, labels = torch.randn(B, D), torch.randint(0, C, (B,))
    head(e, labels, enqueue=False)
    assert head.stats.compensation_norm.item() == pytest.approx((e_star - e_past).norm(dim=1).mean().item(), rel=1e-5)


def test_bf16_storage_close_to_fp32():
    a = _run(_head(queue_size=12), 5)
    b = _run(_head(queue_size=12, storage_dtype=torch.bfloat16), 5)
    assert abs(a[-1][3]["union_loss"] - b[-1][3]["union_loss"]) < 0.02 * abs(a[-1][3]["union_loss"])
    assert a[-1][3]["union_loss"] != b[-1][3]["union_loss"]  # the bf16 queue was really used


def test_bf16_autocast_path():
    torch.manual_seed(0)
    head = BroadFace(ArcFace(C, D), 12, chunk_size=4)
    _run(head, 3)
    e = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(e, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(e.grad).all() and torch.isfinite(head.weight.grad).all()


def test_state_dict_round_trip_restores_training():
    torch.manual_seed(0)
    a = BroadFace(ArcFace(C, D, scale=16.0), 12, diagnostics=True)
    _run(a, 4)  # 20 samples: wrapped
    b = BroadFace(ArcFace(C, D, scale=16.0), 12, diagnostics=True)
    b.load_state_dict(a.state_dict())
    assert (b.queue.ptr, b.queue.fill, b.queue.step) == (a.queue.ptr, a.queue.fill, a.queue.step) == (8, 12, 4)
    ra, rb = _run(a, 3, seed=5), _run(b, 3, seed=5)
    for x, y in zip(ra, rb):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])


def test_checkpoint_state_is_the_fifo_from_slot_zero_and_loads_back():
    """The world-independent form: oldest entry in slot 0, so a fresh head of any layout continues identically."""
    a = _head(queue_size=12)
    _run(a, 4)  # wrapped: the ring's oldest entry is not in slot 0
    state = a.checkpoint_state()
    assert state["queue._extra_state"] == {"ptr": 0, "fill": 12, "step": 4}
    assert torch.equal(state["queue.labels"], a.queue.entries().labels)
    b = _head(queue_size=12)
    b.load_checkpoint_state(state)
    assert torch.equal(b.queue.entries().vectors, a.queue.entries().vectors)
    ra, rb = _run(a, 3, seed=5), _run(b, 3, seed=5)
    for x, y in zip(ra, rb):
        assert torch.allclose(x[0], y[0], rtol=1e-6) and torch.allclose(x[2], y[2], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="room for 6"):
        _head(queue_size=6).load_checkpoint_state(state)
    small = _head(queue_size=6)
    small.load_checkpoint_state(state, drop_oldest=True)  # FIFO: the newest 6 survive
    assert torch.equal(small.queue.entries().labels, state["queue.labels"][-6:])
    with pytest.raises(ValueError, match=r"classifier has shape \(13, 6\).*needs \(14, 6\)"):
        BroadFace(ArcFace(14, D), 12).load_checkpoint_state(state)


def test_full_storage_checkpoint_loads_into_a_compact_queue():
    full = _head(queue_size=12, storage="full")
    _run(full, 3, lr=2.0)
    compact = _head(queue_size=12)
    compact.load_checkpoint_state(full.checkpoint_state())
    w = full.weight.detach()
    a, b = full.queue.entries(), compact.queue.entries()  # oldest first
    assert torch.allclose(compensate(b, w[b.labels]), compensate(a, w[a.labels]), atol=1e-5)
    with pytest.raises(ValueError, match="compact"):
        _head(queue_size=12, storage="full").load_checkpoint_state(compact.checkpoint_state())


def test_legacy_checkpoint_with_tensor_counters_loads():
    """broadface 0.1 kept ptr/fill/step as buffers (and compact probe rows)."""
    a = _head(queue_size=12)
    _run(a, 3)
    old = {k: v for k, v in a.state_dict().items() if not k.endswith("_extra_state")}
    old.update({"queue.ptr": torch.tensor(a.queue.ptr), "queue.fill": torch.tensor(a.queue.fill),
                "queue.step": torch.tensor(a.queue.step), "queue.probe_weights": torch.zeros(3, D)})
    b = _head(queue_size=12)
    b.load_state_dict(old)
    assert (b.queue.ptr, b.queue.fill, b.queue.step) == (3, 12, 3)
    assert torch.equal(b.queue.entries().labels, a.queue.entries().labels)


def test_enqueue_false_and_eval_mode_leave_queue_alone():
    head = BroadFace(ArcFace(C, D), 12)
    e, y = torch.randn(B, D), torch.randint(0, C, (B,))
    head(e, y, enqueue=False)
    assert len(head.queue) == 0
    head.eval()
    head(e, y)
    assert len(head.queue) == 0
    head.train()
    head.enqueue(e, y)
    assert len(head.queue) == B


def test_diagnostics_entries_oldest_first_with_ids_ages_and_both_embeddings():
    torch.manual_seed(0)
    head = BroadFace(ArcFace(C, D, scale=16.0), 12, diagnostics=True)
    assert head.queue.storage == "full"
    g = torch.Generator().manual_seed(3)
    pushed = []
    for step in range(3):  # 3 pushes of 5 into 12 slots: 2 entries of the first step survive
        e, y = torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)
        ids = torch.arange(step * B, (step + 1) * B) + 100
        head(e, y, ids=ids).backward()
        pushed.append((e, y, head.weight.detach().clone()))
        with torch.no_grad():
            head.weight.sub_(1.0 * head.weight.grad)
        head.zero_grad()
    d = head.diagnostics()
    assert d.ids.tolist() == list(range(103, 115))
    assert d.ages.tolist() == [2] * 2 + [1] * 5 + [0] * 5
    e_all = torch.cat([e for e, _, _ in pushed])[3:]
    w_then = torch.cat([w[y] for _, y, w in pushed])[3:]
    y_all = torch.cat([y for _, y, _ in pushed])[3:]
    assert torch.equal(d.labels, y_all) and torch.allclose(d.uncompensated, e_all)
    lam = e_all.norm(dim=1, keepdim=True) / w_then.norm(dim=1, keepdim=True)
    assert torch.allclose(d.compensated, e_all + lam * (head.weight.detach()[y_all] - w_then), atol=1e-6)  # Eq. 7
    comp, plain = d.cosine_error(e_all)  # "current" = the stored e⁻: the uncompensated error is 0
    assert torch.allclose(plain, torch.zeros(12), atol=1e-6) and comp.max() > 1e-3
    with pytest.raises(ValueError, match="diagnostics=True"):
        BroadFace(ArcFace(C, D), 12).diagnostics()
    with pytest.raises(ValueError, match="storage='full'"):
        BroadFace(ArcFace(C, D), 12, storage="compact", diagnostics=True)


def test_rejects_non_margin_head():
    with pytest.raises(ValueError, match="MarginHead"):
        BroadFace(torch.nn.Linear(3, 4))


def test_union_buffers_are_kept_between_steps_and_do_not_change_a_result():
    """The CPU union reuses its logit buffers step after step (no fresh page faults); a head whose buffers
    hold an earlier, larger step's numbers gives the bits of one that starts with none."""
    import copy

    head = _head(queue_size=12, chunk_size=4)
    _run(head, 4)                                            # the queue is full: 5 + 12 union rows
    kept = dict(head.union_buffers.bufs)
    assert kept and head.union_buffers.nbytes() > 0
    fresh = copy.deepcopy(head)
    assert fresh.union_buffers.bufs == {}                    # a copy shares no temporaries
    got, want = _run(head, 2, seed=1), _run(fresh, 2, seed=1)
    assert all(head.union_buffers.bufs[k].data_ptr() == v.data_ptr() for k, v in kept.items())
    for (l1, e1, w1, _), (l2, e2, w2, _) in zip(got, want):
        assert torch.equal(l1, l2) and torch.equal(e1, e2) and torch.equal(w1, w2)
    head.union_buffers.clear()
    assert head.union_buffers.nbytes() == 0
