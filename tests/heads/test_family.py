"""AdaFace, MagFace, CurricularFace and sub-center ArcFace: formulas, gradients, the queue, checkpoints.

Every expected value comes from ``tests/heads/reference.py``: float64 dense losses written from the papers."""
import math

import pytest
import torch

from broadface.heads import AdaFace, ArcFace, BroadFace, CurricularFace, MagFace, SubCenterArcFace

from .reference import (NaiveFamilyBroadFace, RefAdaFace, RefCurricularFace, RefMagFace, RefSubCenter,
                        assert_steps_match, margin_target)

C, D, B, S = 13, 6, 5, 16.0
FAMILY = {  # name: (our head, the paper's reference), paper defaults except the scale
    "adaface": (lambda: AdaFace(C, D, scale=S), lambda: RefAdaFace(S)),
    "magface": (lambda: MagFace(C, D, scale=S), lambda: RefMagFace(S)),
    "curricularface": (lambda: CurricularFace(C, D, scale=S), lambda: RefCurricularFace(S)),
    "subcenter": (lambda: SubCenterArcFace(C, D, scale=S), lambda: RefSubCenter(S)),
}


def batch(g, n=B):
    """Embeddings whose norms spread over 2..60 (AdaFace's scaler and MagFace's [10, 110] both matter)."""
    e = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    e = e * (2 + 58 * torch.rand(n, 1, generator=g))
    return e, torch.randint(0, C, (n,), generator=g)


def _thetas():  # θ near 0, interior, near and at π
    return torch.tensor([0.0, 1e-4, 0.05, 0.3, 1.2, 2.0, 2.6, 3.0, math.pi - 1e-4, math.pi], dtype=torch.float64)


@pytest.mark.parametrize("norm", [1.0, 15.0, 40.0, 130.0])
def test_norm_margin_targets_match_the_papers_from_0_to_pi(norm):
    cos = torch.cos(_thetas()).float()
    c64 = cos.double()  # the angle the fp32 cosine really encodes
    norms = torch.full_like(cos, norm)
    ada, ref = AdaFace(3, 4), RefAdaFace(64.0)
    ada.batch_mean.fill_(25.0), ada.batch_std.fill_(12.0)
    ref.mean, ref.std = 25.0, 12.0
    assert torch.allclose(ada.target(cos, norms).double(), ref.target(c64, norms.double()), atol=2e-6)
    mag, refm = MagFace(3, 4), RefMagFace(64.0)
    assert torch.allclose(mag.target(cos, norms).double(), refm.target(c64, norms.double()), atol=2e-6)
    for head in (ada, mag):  # finite slopes everywhere, also at cos = ±1
        c = cos.clone().requires_grad_(True)
        head.target(c, norms).sum().backward()
        assert torch.isfinite(c.grad).all()


def test_curricular_and_subcenter_targets_are_arcface_and_negatives_follow_the_paper():
    cos = torch.cos(_thetas()).float()
    want = margin_target(cos.double(), 1.0, 0.5, 0.0)
    assert torch.allclose(CurricularFace(3, 4).target(cos).double(), want, atol=2e-6)
    assert torch.allclose(SubCenterArcFace(3, 4).target(cos).double(), want, atol=2e-6)
    head, ref = CurricularFace(3, 4), RefCurricularFace(64.0)
    head.t.fill_(0.3)
    ref.t = 0.3
    grid = torch.linspace(-1, 1, 41)
    rows = torch.cat([cos[:, None], grid.expand(len(cos), -1)], dim=1)  # column 0 is each row's target
    y = torch.zeros(len(cos), dtype=torch.long)
    got = head.negatives(rows, rows[:, :1])
    assert torch.allclose(got.double(), ref.negatives(rows.double(), y), atol=2e-6)
    assert (got != rows).any(), "no hard negative in the grid: the test would prove nothing"


@pytest.mark.parametrize("name", list(FAMILY))
def test_loss_and_gradients_match_the_dense_reference(name):
    """The margin head alone (training mode: the batch statistics move first), values and both gradients."""
    ours, ref = FAMILY[name][0](), FAMILY[name][1]()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.weight.normal_(generator=g)
    for _ in range(3):
        e, y = batch(g, 9)
        x = e.clone().requires_grad_(True)
        loss = ours(x, y)
        ours.zero_grad()
        loss.backward()
        xr = e.double().requires_grad_(True)
        wr = ours.weight.detach().double().requires_grad_(True)
        ref.observe(xr, wr, y)
        want = ref.loss(xr, wr, y, xr.norm(dim=1)) + ref.regularizer(xr)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-4)
        assert torch.allclose(ours.weight.grad.double(), wr.grad, atol=1e-6, rtol=1e-4)
    if name == "adaface":
        assert ours.batch_mean.item() == pytest.approx(ref.mean, rel=1e-5)
        assert ours.batch_std.item() == pytest.approx(ref.std, rel=1e-5)
    if name == "curricularface":
        assert ours.t.item() == pytest.approx(ref.t, rel=1e-5, abs=1e-7) and ours.t.item() != 0


@pytest.mark.parametrize("name", list(FAMILY))
def test_broadface_with_each_margin_matches_the_naive_queue(name):
    """Eq. 8/9 with Eq. 7 over a wrapping queue: what entries keep (‖e⁻‖, the sub-centre), what is recomputed
    (batch statistics from the mini-batch), all against the reference built from the papers."""
    ours = BroadFace(FAMILY[name][0](), queue_size=12, chunk_size=4)
    ref = NaiveFamilyBroadFace(FAMILY[name][1](), 12)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.weight.normal_(generator=g)
    assert_steps_match(ours, ref, (batch(g) for _ in range(6)))  # 30 samples through 12 slots
    assert ours.stats.queue_fill == 12


@pytest.mark.parametrize("name,extra", [("adaface", 1), ("magface", 1), ("curricularface", 0), ("subcenter", 1)])
def test_compact_entries_grow_by_exactly_what_the_margin_needs(name, extra):
    head = BroadFace(FAMILY[name][0](), queue_size=12)
    per_entry = sum(b[0].numel() for _, b in head.queue.named_buffers())
    assert per_entry == D + 2 + extra  # u, λ, label (+ ‖e⁻‖ or the sub-centre)
    assert sum(b[0].numel() for _, b in BroadFace(ArcFace(C, D), 12).queue.named_buffers()) == D + 2


@pytest.mark.parametrize("name", ["adaface", "magface"])
def test_norm_margins_score_queued_entries_with_their_norm_at_enqueue(name):
    head = BroadFace(FAMILY[name][0](), queue_size=12)
    g = torch.Generator().manual_seed(2)
    pushed = []
    for _ in range(2):
        e, y = batch(g)
        head(e, y)
        pushed.append(e)
    assert torch.allclose(head.queue.norms[:10], torch.cat(pushed).norm(dim=1))
    e, y = batch(g)
    head.eval()  # no statistics update, no push: two forwards see the same state
    head(e, y)
    before = (head.stats.batch_loss.clone(), head.stats.union_loss.clone())
    head.queue.norms[:10] = 60.0  # the queue's norms, not ‖e*‖, set the margins of the queued rows
    head(e, y)
    assert torch.equal(head.stats.batch_loss, before[0]) and head.stats.union_loss != before[1]


def test_curricular_t_and_adaface_statistics_come_from_the_mini_batch_only():
    g = torch.Generator().manual_seed(3)
    cur, ada = BroadFace(CurricularFace(C, D, scale=S), 40), BroadFace(AdaFace(C, D, scale=S), 40)
    for head in (cur, ada):
        for _ in range(4):
            head(*batch(g))  # 20 queued entries of other norms and cosines
    e, y = batch(g)
    t0, mean0, std0 = cur.margin.t.clone(), ada.margin.batch_mean.clone(), ada.margin.batch_std.clone()
    cos_y = cur.margin.cosine(e)[torch.arange(B), y]
    cur(e, y)
    ada(e, y)
    assert cur.margin.t.item() == pytest.approx(0.99 * t0.item() + 0.01 * cos_y.mean().item(), rel=1e-6)
    n = e.norm(dim=1)
    assert ada.margin.batch_mean.item() == pytest.approx(0.99 * mean0.item() + 0.01 * n.mean().item(), rel=1e-6)
    assert ada.margin.batch_std.item() == pytest.approx(0.99 * std0.item() + 0.01 * n.std().item(), rel=1e-6)


def test_subcenter_entries_follow_their_dominant_subcenter():
    head = BroadFace(SubCenterArcFace(C, D, scale=S), 12, storage="full")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        head.weight.normal_(generator=g)
    e, y = batch(g)
    w = head.weight.detach().clone()
    head(e, y)
    cos = torch.einsum("nd,nkd->nk", torch.nn.functional.normalize(e, dim=1),
                       torch.nn.functional.normalize(w[y], dim=-1))
    k = cos.argmax(dim=1)
    assert torch.equal(head.queue.subcenters[:B], k) and (k != k[0]).any()
    assert torch.equal(head.queue.past_weights[:B], w[y, k])  # W⁻_y is that sub-centre's row


@pytest.mark.parametrize("name", list(FAMILY))
def test_bf16_autocast_keeps_fp32_logits(name):
    torch.manual_seed(0)
    head = BroadFace(FAMILY[name][0](), 12, chunk_size=4)
    head.eval()
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        head.enqueue(*batch(g))
    e, y = batch(g)
    x = e.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, y)
    ref = head(e, y)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=0.05)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("name", list(FAMILY))
def test_checkpoint_state_keeps_the_batch_statistics_and_the_entries(name):
    g = torch.Generator().manual_seed(6)
    a = BroadFace(FAMILY[name][0](), 12)
    for _ in range(4):
        a(*batch(g))
    state = a.checkpoint_state()
    b = BroadFace(FAMILY[name][0](), 12)
    b.load_checkpoint_state(state)
    for (k, x), (_, y) in zip(a.margin.named_buffers(), b.margin.named_buffers()):
        assert torch.equal(x, y), k
    for k, v in a.queue.entries().tensors().items():
        assert torch.equal(v, getattr(b.queue.entries(), k)), k
    e, y = batch(g)
    assert torch.equal(a(e, y), b(e, y)) and torch.equal(a.stats.union_loss, b.stats.union_loss)


def test_a_queue_without_what_the_margin_needs_is_refused():
    g = torch.Generator().manual_seed(7)
    arc = BroadFace(ArcFace(C, D), 12)
    arc(*batch(g))
    with pytest.raises(ValueError, match="‖e⁻‖"):
        BroadFace(AdaFace(C, D), 12).load_checkpoint_state(arc.checkpoint_state())
    with pytest.raises(ValueError, match="sub-centre"):
        BroadFace(SubCenterArcFace(C, D), 12).load_checkpoint_state(
            {**arc.checkpoint_state(), "margin.weight": torch.zeros(C, 3, D)})
    with pytest.raises(ValueError, match=r"\(13, 3, 6\)"):
        BroadFace(SubCenterArcFace(C, D), 12).load_checkpoint_state(arc.checkpoint_state())


@pytest.mark.parametrize("make,match", [
    (lambda: AdaFace(C, D, t_alpha=0.0), "t_alpha"), (lambda: MagFace(C, D, l_a=20, u_a=10), "l_a < u_a"),
    (lambda: CurricularFace(C, D, alpha=2.0), "alpha"), (lambda: SubCenterArcFace(C, D, subcenters=0), "subcenters"),
])
def test_bad_margin_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
