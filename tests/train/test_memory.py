"""Micro-batched encoder passes under a whole-batch BroadFace head give the full-batch gradients."""
import copy
import functools

import pytest
import torch
from torch import nn

from broadface.heads import ArcFace, BroadFace, ShardedBroadFace
from broadface.train.memory import micro_batch_backward

C, D, B = 11, 8, 10


def make(bn=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(12, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.PReLU(16), nn.Dropout(dropout),
                                                                            nn.Linear(16, D)]
    enc = nn.Sequential(*layers)
    head = BroadFace(ArcFace(C, D, scale=16.0), queue_size=48)
    with torch.no_grad():
        head.weight.normal_()
    return enc, head


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 12, generator=g), torch.randint(0, C, (B,), generator=g)


def grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def same(ga, gb):
    """Equal up to float32 summation order (matmuls over micro-batches of other sizes)."""
    return (ga - gb).abs().max() <= 1e-5 * gb.abs().max().clamp_min(1.0)


def reference(enc, head, x, y, micro):
    """Plain autograd through the same micro-batched network: one graph, the head once."""
    out = torch.cat([enc(c) for c in x.split(micro)])
    loss = head(out, y)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("micro", [1, 3, 10])
def test_equals_full_batch_without_bn(micro):
    (enc, head), (enc2, head2) = make(), make()
    x, y = data()
    for step in range(3):  # the queue fills: the head's gradient depends on history too
        for m in (enc, head, enc2, head2):
            m.zero_grad()
        a, _ = micro_batch_backward(enc, lambda e: head(e, y), x + step, micro)
        b = head2(enc2(x + step), y)
        b.backward()
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        for ga, gb in zip(grads(enc, head), grads(enc2, head2)):
            assert same(ga, gb)
    assert len(head.queue) == len(head2.queue) == 3 * B  # the head saw each batch once


@pytest.mark.parametrize("sampled_head", [False, True])
def test_dropout_masks_are_replayed(sampled_head):
    (enc, head), (enc2, head2) = make(dropout=0.5), make(dropout=0.5)
    if sampled_head:  # a head that draws random numbers too (negative-class sampling)
        head, head2 = (ShardedBroadFace(functools.partial(ArcFace, scale=16.0), C, D, queue_size=24,
                                        sample_rate=0.5, encoder_grad="global") for _ in range(2))
    x, y = data()
    torch.manual_seed(5)
    micro_batch_backward(enc, lambda e: head(e, y), x, 4)
    after = torch.rand(1)
    torch.manual_seed(5)
    reference(enc2, head2, x, y, 4)
    assert torch.equal(after, torch.rand(1))  # the RNG ends where one forward would leave it
    for ga, gb in zip(grads(enc, head), grads(enc2, head2)):
        assert same(ga, gb)


def test_batchnorm_eval_exact_and_train_per_micro_batch():
    (enc, head), (enc2, head2) = make(bn=True), make(bn=True)
    x, y = data()
    enc.eval(), enc2.eval()
    micro_batch_backward(enc, lambda e: head(e, y), x, 3)
    head2(enc2(x), y).backward()
    for ga, gb in zip(grads(enc, head), grads(enc2, head2)):
        assert same(ga, gb)
    # train mode: each micro-batch normalised with its own statistics (the documented caveat),
    # running statistics updated once per micro-batch, not twice
    (enc, head), (enc2, head2) = make(bn=True), make(bn=True)
    micro_batch_backward(enc, lambda e: head(e, y), x, 5)
    reference(enc2, head2, x, y, 5)
    for ga, gb in zip(grads(enc, head), grads(enc2, head2)):
        assert same(ga, gb)
    bn, bn2 = enc[1], enc2[1]
    assert torch.allclose(bn.running_mean, bn2.running_mean) and int(bn.num_batches_tracked) == 2
    full = copy.deepcopy(make(bn=True)[0])
    full(x)
    assert not torch.allclose(bn.running_var, full[1].running_var)  # differs from one full-batch pass


def test_bf16_autocast_and_errors():
    enc, head = make()
    x, y = data()
    dtypes = []
    enc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    loss, emb = micro_batch_backward(enc, lambda e: head(e, y), x, 4,
                                     autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads(enc, head))
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) == 6  # both passes of 3 micro-batches ran under autocast
    assert emb.shape == (B, D) and not emb.requires_grad
    with pytest.raises(ValueError, match="micro_batch"):
        micro_batch_backward(enc, lambda e: head(e, y), x, 0)
    with pytest.raises(ValueError, match="labels"):
        micro_batch_backward(enc, lambda e: head(e, y[:-1]), x, 4)
