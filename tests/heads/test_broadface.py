import pytest
import torch

from broadface.heads import ArcFace, BroadFace, CosFace, chunked_margin_ce

from .reference import NaiveBroadFace, dense_margin_loss

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
        out.append((loss.detach(), e.grad.clone(), head.weight.grad.clone(), head.last_stats))
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
    for step in range(6):  # 30 samples through a 12-entry queue
        e = torch.randn(B, D, generator=g).requires_grad_(True)
        y = torch.randint(0, C, (B,), generator=g)
        w_before = head.weight.detach().clone()
        r_batch, r_ge, r_union, r_gw = ref.grads(w_before, e, y)
        head.zero_grad()
        loss = head(e, y)
        loss.backward()
        assert loss.item() == pytest.approx(r_batch.item(), rel=1e-5), step
        assert head.last_stats["union_loss"] == pytest.approx(r_union.item(), rel=1e-5), step
        assert torch.allclose(e.grad.double(), r_ge, atol=1e-6, rtol=1e-4), step
        assert torch.allclose(head.weight.grad.double(), r_gw, atol=1e-6, rtol=1e-4), step
        with torch.no_grad():
            head.weight.sub_(2.0 * head.weight.grad)  # large steps: compensation matters
    assert head.last_stats["queue_fill"] == 12


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
        if sb["compensation_norm"] is not None:
            assert sa["compensation_norm"] == pytest.approx(sb["compensation_norm"], rel=1e-4)


def test_bf16_storage_close_to_fp32():
    a = _run(_head(queue_size=12), 5)
    b = _run(_head(queue_size=12, storage_dtype=torch.bfloat16), 5)
    assert abs(a[-1][3]["union_loss"] - b[-1][3]["union_loss"]) < 0.02 * abs(a[-1][3]["union_loss"])


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
    a = BroadFace(ArcFace(C, D, scale=16.0), 12, track_ids=True)
    _run(a, 4)  # 20 samples: wrapped
    b = BroadFace(ArcFace(C, D, scale=16.0), 12, track_ids=True)
    b.load_state_dict(a.state_dict())
    ra, rb = _run(a, 3, seed=5), _run(b, 3, seed=5)
    for x, y in zip(ra, rb):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])


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


def test_compensation_error_diagnostic():
    torch.manual_seed(0)
    head = BroadFace(ArcFace(C, D, scale=16.0), 12, storage="full", track_ids=True)
    _run(head, 3, lr=1.0)
    order = head.queue.order()
    past = head.queue.uncompensated()[order]
    err = head.compensation_error(past)  # "current" = the stored e⁻ → uncompensated error is 0
    assert torch.allclose(err["uncompensated"], torch.zeros(len(order)), atol=1e-6)
    assert (err["compensated"] > 0).any()
    # 3 pushes of 5 into 12 slots: 2 entries of the first step survive, oldest first
    assert err["age"].tolist() == [2] * 2 + [1] * 5 + [0] * 5


def test_rejects_non_margin_head():
    with pytest.raises(ValueError, match="MarginHead"):
        BroadFace(torch.nn.Linear(3, 4))
