"""The class-sharded heads on 2 gloo processes equal the single-process heads on the same global batch."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from broadface.dist import rank_slice
from broadface.heads import (AdaFace, ArcFace, BroadFace, CosFace, CurricularFace, MagFace, ShardedBroadFace,
                             ShardedMarginHead, SubCenterArcFace, chunked_margin_ce)
from broadface.heads.partition import init_rows
from broadface.train.memory import micro_batch_backward
from tests.helpers import spawn

D, S, LR, WORLD = 6, 16.0, 2.0, 2
MARGINS = {"arcface": ArcFace, "cosface": CosFace, "adaface": AdaFace, "magface": MagFace,
           "curricularface": CurricularFace, "subcenter": SubCenterArcFace}
FAMILY = ("adaface", "magface", "curricularface", "subcenter")
CONFIGS = {  # N: global batch; Q: queue per rank; 6 steps push 36 samples through a 12-entry union: wrap-around
    "partial_fc": dict(C=13, N=7, steps=3, Q=0, margin="arcface", grad="global"),  # uneven classes and batch (4+3)
    "local": dict(C=13, N=6, steps=6, Q=6, mode="local", margin="arcface", grad="global", chunk=4),
    "replicated": dict(C=13, N=6, steps=6, Q=5, mode="replicated", margin="cosface", grad="ddp", chunk=3),
    "sampled": dict(C=40, N=4, steps=5, Q=4, mode="local", margin="arcface", grad="global", rate=0.3),
    "full": dict(C=13, N=6, steps=4, Q=6, mode="local", margin="arcface", grad="global", storage="full"),
    # the margin family (embedding norms spread over 1..25: AdaFace's and MagFace's margins vary), every
    # queue mode and encoder gradient among them, and each with class sampling
    "adaface": dict(C=13, N=6, steps=5, Q=6, mode="local", margin="adaface", grad="global", chunk=4, spread=True),
    "magface": dict(C=13, N=6, steps=5, Q=5, mode="replicated", margin="magface", grad="ddp", chunk=3, spread=True),
    "curricularface": dict(C=13, N=7, steps=5, Q=6, mode="local", margin="curricularface", grad="global", chunk=4,
                           spread=True),
    "subcenter": dict(C=13, N=6, steps=5, Q=6, mode="local", margin="subcenter", grad="ddp", chunk=4, spread=True),
    **{f"sampled_{m}": dict(C=40, N=4, steps=5, Q=4, mode="local", margin=m, grad="global", rate=0.3, spread=True)
       for m in FAMILY},
}


def initial_weight(c, rest=(D,)):
    return torch.randn(c, *rest, generator=torch.Generator().manual_seed(0))  # λ ≈ 1, like a trained W


def global_batches(cfg, seed=1, dim=D):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(cfg["N"], dim, generator=g), torch.randint(0, cfg["C"], (cfg["N"],), generator=g))
           for _ in range(cfg["steps"])]
    if cfg.get("spread"):
        out = [(e * (0.5 + 10 * torch.rand(len(e), 1, generator=g)), y) for e, y in out]
    return out


def build_sharded(cfg):
    margin = functools.partial(MARGINS[cfg["margin"]], scale=S)
    if cfg["Q"] == 0:
        head = ShardedMarginHead(margin, cfg["C"], D, encoder_grad=cfg["grad"])
    else:
        head = ShardedBroadFace(margin, cfg["C"], D, queue_size=cfg["Q"], queue_mode=cfg["mode"],
                                sample_rate=cfg.get("rate", 1.0), encoder_grad=cfg["grad"],
                                chunk_size=cfg.get("chunk", 4096), storage=cfg.get("storage", "compact"))
    p = head.partition
    with torch.no_grad():
        head.weight.copy_(initial_weight(cfg["C"], head.weight.shape[1:])[p.class_start:p.class_stop])
    return head


def _equivalence_worker(rank, world, tmp):
    for name, cfg in CONFIGS.items():
        head, out = build_sharded(cfg), []
        for e_global, y_global in global_batches(cfg):
            part = rank_slice(cfg["N"], world, rank)
            e = e_global[part].clone().requires_grad_(True)
            head.zero_grad()
            loss = head(e, y_global[part])
            loss.backward()
            sampled = head.partition.last_sampled
            out.append(dict(loss=loss.item(), stats=head.stats.as_dict(), e_grad=e.grad.clone(),
                            w_grad=head.weight.grad.clone(), sampled=None if sampled is None else sampled.clone()))
            with torch.no_grad():
                head.weight.sub_(LR * head.weight.grad)
        torch.save(out, tmp / f"{name}.{rank}.pt")
    torch.save(_ddp_micro_batch_run(rank, world), tmp / f"ddp.{rank}.pt")
    head = build_sharded(CONFIGS["local"])  # bad labels on rank 1 only: every rank raises, none hangs
    labels = torch.tensor([0, 1, 99 if rank else 2])
    try:
        head(torch.randn(3, D), labels)
        torch.save("no error", tmp / f"bad.{rank}.pt")
    except ValueError as err:
        torch.save(str(err), tmp / f"bad.{rank}.pt")
    fresh = build_sharded(CONFIGS["local"]).checkpoint_state()  # empty queues gather too
    assert rank or fresh["queue._extra_state"]["fill"] == 0
    torch.save(ShardedMarginHead(ArcFace, 3000, D, init_seed=7).weight.detach(), tmp / f"init.{rank}.pt")


def _encoder():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, D))


DDP_CFG = dict(C=13, N=6, steps=3, Q=3, mode="replicated", margin="arcface", grad="ddp", chunk=5)


def _ddp_micro_batch_run(rank, world):
    """DDP encoder + sharded BroadFace, 2 micro-batches per rank; returns encoder grads and losses per step."""
    enc = nn.parallel.DistributedDataParallel(_encoder())
    head, out = build_sharded(DDP_CFG), []
    for x_global, y_global in global_batches(DDP_CFG, seed=4, dim=8):
        part = rank_slice(DDP_CFG["N"], world, rank)
        enc.zero_grad()
        head.zero_grad()
        y = y_global[part]
        loss, _ = micro_batch_backward(enc, lambda e: head(e, y), x_global[part], micro_batch=2)
        out.append(dict(loss=loss.item(), grads=[p.grad.clone() for p in enc.parameters()]))
        with torch.no_grad():
            for p in list(enc.parameters()) + [head.weight]:
                p.sub_(0.5 * p.grad)
    return out


def _reference(cfg):
    """The existing single-process heads with the full classifier, driven with the same global batches."""
    margin = MARGINS[cfg["margin"]](cfg["C"], D, scale=S)
    head = margin if cfg["Q"] == 0 else BroadFace(margin, queue_size=WORLD * cfg["Q"], chunk_size=5)
    with torch.no_grad():
        head.weight.copy_(initial_weight(cfg["C"], head.weight.shape[1:]))
    out = []
    for e, y in global_batches(cfg):
        e = e.clone().requires_grad_(True)
        head.zero_grad()
        loss = head(e, y)
        loss.backward()
        union = head.stats.union_loss.item() if cfg["Q"] else loss.item()
        out.append(dict(loss=loss.item(), union=union, e_grad=e.grad.clone(), w_grad=head.weight.grad.clone()))
        with torch.no_grad():
            head.weight.sub_(LR * head.weight.grad)
    return out


def _sampled_reference(cfg, sampled_per_step):
    """Single process over the same sampled class set: BroadFace's queue and pieces, W[S] with autograd."""
    head = BroadFace(MARGINS[cfg["margin"]](cfg["C"], D, scale=S), queue_size=WORLD * cfg["Q"])
    with torch.no_grad():
        head.weight.copy_(initial_weight(cfg["C"], head.weight.shape[1:]))
    w, m, out = head.weight, head.margin, []
    for (e, y), sampled in zip(global_batches(cfg), sampled_per_step):
        remap = torch.full((cfg["C"],), -1, dtype=torch.long)
        remap[sampled] = torch.arange(len(sampled))
        queued = head.queue.live()
        union_y = torch.cat([y, queued.labels])
        assert (remap[union_y] >= 0).all(), "a positive of the batch or the queue was not sampled"
        e = e.clone().requires_grad_(True)
        batch = m.loss(e, remap[y], weight=w.detach()[sampled])  # training mode: statistics move first
        batch.backward()
        feats = torch.cat([e.detach(), head.queue.compensated(w)])
        opts = {"norm": torch.cat([e.detach().norm(dim=1), queued.norms])} if m.uses_norm else {}
        opts.update({"negatives": m.negatives} if m.negatives is not None else {})
        union = chunked_margin_ce(F.normalize(w[sampled], dim=-1), F.normalize(feats, dim=1), remap[union_y],
                                  m.target, S, **opts)
        head.zero_grad()
        union.backward()
        out.append(dict(loss=batch.item(), union=union.item(), e_grad=e.grad.clone(), w_grad=w.grad.clone()))
        head.enqueue(e, y)
        with torch.no_grad():
            w.sub_(LR * w.grad)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    spawn(_equivalence_worker, WORLD, tmp)
    out = {name: [torch.load(tmp / f"{name}.{r}.pt", weights_only=False) for r in range(WORLD)]
           for name in [*CONFIGS, "ddp"]}
    return dict(out, tmp=tmp)


def close(a, b, rtol=1e-4, atol=1e-6):
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["partial_fc", "local", "replicated", "full", *FAMILY])
def test_two_ranks_equal_one_process(runs, name):
    """sample_rate=1: losses, encoder gradients and classifier gradients match the full-classifier head."""
    cfg, ranks = CONFIGS[name], runs[name]
    scale = WORLD if cfg["grad"] == "ddp" else 1
    for step, ref in enumerate(_reference(cfg)):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert r0["loss"] == pytest.approx(ref["loss"], rel=1e-5) and r1["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r0["stats"]["union_loss"] == pytest.approx(ref["union"], rel=1e-5), step
        e_grad = torch.cat([r0["e_grad"], r1["e_grad"]])
        assert close(e_grad, scale * ref["e_grad"]), step
        assert close(torch.cat([r0["w_grad"], r1["w_grad"]]), ref["w_grad"]), step
        if cfg["Q"]:
            assert r0["stats"]["queue_fill"] == min(WORLD * cfg["Q"], step * cfg["N"])
    assert ranks[0][0]["w_grad"].shape[0] == 7 and ranks[1][0]["w_grad"].shape[0] == 6  # 13 = 7 + 6
    if cfg.get("storage") == "full":  # full storage keeps W⁻_y: the compensation norm of every rank's queue
        assert ranks[0][-1]["stats"]["compensation_norm"] > 0
        assert ranks[0][-1]["stats"]["compensation_norm"] == pytest.approx(ranks[1][-1]["stats"]["compensation_norm"])


@pytest.mark.parametrize("name", ["sampled", *[f"sampled_{m}" for m in FAMILY]])
def test_sampling_keeps_positives_and_matches_same_class_set(runs, name):
    cfg, (r0, r1) = CONFIGS[name], runs[name]
    sampled = [torch.cat([a["sampled"], b["sampled"]]) for a, b in zip(r0, r1)]
    assert all(len(s) < cfg["C"] for s in sampled), "sampling kept every class: the test would prove nothing"
    for step, (s, a, b) in enumerate(zip(sampled, r0, r1)):
        assert len(a["sampled"]) >= math.ceil(cfg["rate"] * 20) and len(b["sampled"]) >= math.ceil(cfg["rate"] * 20)
        assert a["stats"]["sampled_classes"] == len(a["sampled"])
    for step, ref in enumerate(_sampled_reference(cfg, sampled)):
        a, b = r0[step], r1[step]
        assert a["loss"] == pytest.approx(ref["loss"], rel=1e-5), step
        assert a["stats"]["union_loss"] == pytest.approx(ref["union"], rel=1e-5), step
        assert close(torch.cat([a["e_grad"], b["e_grad"]]), ref["e_grad"]), step
        w_grad = torch.cat([a["w_grad"], b["w_grad"]])
        assert close(w_grad, ref["w_grad"]), step
        unsampled = torch.ones(cfg["C"], dtype=torch.bool)
        unsampled[sampled[step]] = False
        assert (w_grad[unsampled] == 0).all()  # rows outside the sampled set get no gradient


def test_ddp_micro_batched_encoder_gradient_equals_full_batch(runs):
    """DDP averaging × encoder_grad='ddp' + micro-batching == one process on the whole global batch."""
    enc = _encoder()
    head = BroadFace(ArcFace(DDP_CFG["C"], D, scale=S), queue_size=WORLD * DDP_CFG["Q"])
    with torch.no_grad():
        head.weight.copy_(initial_weight(DDP_CFG["C"]))
    for step, (x, y) in enumerate(global_batches(DDP_CFG, seed=4, dim=8)):
        enc.zero_grad()
        head.zero_grad()
        loss = head(enc(x), y)
        loss.backward()
        for r in range(WORLD):
            got = runs["ddp"][r][step]
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-5), step
            for g, p in zip(got["grads"], enc.parameters()):
                assert close(g, p.grad), step
        with torch.no_grad():
            for p in list(enc.parameters()) + [head.weight]:
                p.sub_(0.5 * p.grad)


def test_bad_input_on_one_rank_raises_on_every_rank(runs):
    tmp = runs["tmp"]
    assert "label 99 is outside [0, 13)" in torch.load(tmp / "bad.1.pt")
    assert "rank(s) [1] passed invalid" in torch.load(tmp / "bad.0.pt")


def test_single_process_sharded_head_is_the_plain_head():
    """Without a process group the sharded heads are the ordinary ones (world = 1)."""
    cfg = dict(CONFIGS["local"], Q=12)
    head = build_sharded(dict(cfg, grad="global"))
    ref = BroadFace(ArcFace(13, D, scale=S), queue_size=12)
    with torch.no_grad():
        ref.weight.copy_(head.weight)
    for e, y in global_batches(cfg)[:4]:
        e1, e2 = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
        head.zero_grad()
        ref.zero_grad()
        head(e1, y).backward()
        ref(e2, y).backward()
        assert close(e1.grad, e2.grad) and close(head.weight.grad, ref.weight.grad)
        with torch.no_grad():
            head.weight.sub_(LR * head.weight.grad)
            ref.weight.sub_(LR * ref.weight.grad)


def test_enqueue_false_then_enqueue_equals_inline_push():
    a, b = build_sharded(CONFIGS["local"]), build_sharded(CONFIGS["local"])
    for e, y in global_batches(CONFIGS["local"])[:3]:
        a(e, y)
        b(e, y, enqueue=False)
        b.enqueue(e, y)
    assert torch.equal(a.queue.vectors, b.queue.vectors) and torch.equal(a.queue.labels, b.queue.labels)


def test_world_independent_initialisation(runs):
    """Row c of W depends only on (init_seed, c): any split, on any rank, gives the same classifier."""
    full = ShardedMarginHead(ArcFace, 3000, D, init_seed=7).weight.detach()
    assert full.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.equal(full, ShardedMarginHead(ArcFace, 3000, D, init_seed=7).weight)
    assert not torch.equal(full, ShardedMarginHead(ArcFace, 3000, D, init_seed=8).weight)
    two_ranks = torch.cat([torch.load(runs["tmp"] / f"init.{r}.pt") for r in range(WORLD)])  # rows 0..1499, 1500..
    assert torch.equal(two_ranks, full)
    for start, stop in ((1500, 3000), (700, 2100), (1024, 1025)):  # shards that start inside a seeded block
        part = torch.empty(stop - start, D)
        init_rows(part, start, seed=7)
        assert torch.equal(part, full[start:stop]), (start, stop)


def test_bad_input_is_a_clear_error():
    head = build_sharded(CONFIGS["local"])
    with pytest.raises(ValueError, match="shape"):
        head(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        head(torch.randn(4, D), torch.tensor([0, 1, 2, 13]))
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedBroadFace(ArcFace, 13, D, sample_rate=0.0)
    with pytest.raises(ValueError, match="queue_mode"):
        ShardedBroadFace(ArcFace, 13, D, queue_mode="global")
    with pytest.raises(ValueError, match="MarginHead"):
        ShardedMarginHead(lambda c, d: nn.Linear(d, c), 13, D)
    with pytest.raises(ValueError, match="encoder_grad"):
        ShardedMarginHead(ArcFace, 13, D, encoder_grad="sum")


@pytest.mark.parametrize("name", ["sampled", *[f"sampled_{m}" for m in FAMILY]])
def test_one_process_sampled_union_matches_the_same_class_set(name):
    """Partial FC on the union in one process: every positive of batch and queue kept, a fraction of the
    negatives, the sampled rows' gradients exact, the other rows' zero."""
    cfg = CONFIGS[name]
    head = BroadFace.sharded(functools.partial(MARGINS[cfg["margin"]], scale=S), cfg["C"], D, WORLD * cfg["Q"],
                             sample_rate=cfg["rate"], encoder_grad="global")
    with torch.no_grad():
        head.weight.copy_(initial_weight(cfg["C"], head.weight.shape[1:]))
    got, sampled = [], []
    for e, y in global_batches(cfg):
        e = e.clone().requires_grad_(True)
        head.zero_grad()
        loss = head(e, y)
        loss.backward()
        sampled.append(head.partition.last_sampled.clone())
        got.append(dict(loss=loss.item(), union=head.stats.union_loss.item(), e_grad=e.grad.clone(),
                        w_grad=head.weight.grad.clone()))
        with torch.no_grad():
            head.weight.sub_(LR * head.weight.grad)
    assert all(len(s) < cfg["C"] for s in sampled) and min(len(s) for s in sampled) >= math.ceil(0.3 * cfg["C"])
    for step, (ref, a, s) in enumerate(zip(_sampled_reference(cfg, sampled), got, sampled)):
        assert a["loss"] == pytest.approx(ref["loss"], rel=1e-5) and a["union"] == pytest.approx(ref["union"], rel=1e-5)
        assert close(a["e_grad"], ref["e_grad"]) and close(a["w_grad"], ref["w_grad"]), step
        unsampled = torch.ones(cfg["C"], dtype=torch.bool)
        unsampled[s] = False
        assert (a["w_grad"][unsampled] == 0).all()
