import numpy as np
import pytest
import torch
from torch import nn

from broadface.models.embed import embed_dataset, embed_tensors


class Tiny(nn.Module):
    """Conv + BN + dropout (train/eval behaviour differs) -> 8-d embedding; asymmetric so flips matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 8)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.bn(self.conv(x)), 4)
        return self.fc(self.drop(x.flatten(1)))


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i * 10


def test_flip_sum_then_l2_and_mode_restored():
    model = Tiny().train()
    model.bn.eval()  # mixed modes must come back exactly
    x = torch.randn(5, 3, 32, 32)
    emb = embed_tensors(model, x)
    assert model.training and not model.bn.training and model.drop.training
    model.eval()
    with torch.no_grad():
        ref = model(x).double() + model(torch.flip(x, dims=[3])).double()
    torch.testing.assert_close(emb, nn.functional.normalize(ref, dim=1).float())
    assert torch.allclose(emb.norm(dim=1), torch.ones(5))
    raw = embed_tensors(model, x, flip=False, normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(raw, model(x))


def test_embed_dataset_order_labels_and_batches():
    model = Tiny()
    x = torch.randn(11, 3, 32, 32)
    emb, labels = embed_dataset(model, Pairs(x), batch_size=4, return_labels=True)
    assert emb.dtype == np.float32 and emb.shape == (11, 8)
    np.testing.assert_array_equal(labels, np.arange(11) * 10)
    np.testing.assert_allclose(emb, embed_tensors(model, x).numpy(), atol=1e-6)
    assert model.training  # restored
    e64 = embed_dataset(model, Pairs(x), batch_size=3, dtype=np.float64, flip=False)
    assert e64.dtype == np.float64 and not np.allclose(e64, emb.astype(np.float64), atol=1e-3)


def test_embed_dataset_errors():
    with pytest.raises(ValueError, match="empty"):
        embed_dataset(Tiny(), Pairs(torch.zeros(0, 3, 32, 32)))
    with pytest.raises(ValueError, match="move the model first"):
        embed_dataset(Tiny(), Pairs(torch.zeros(2, 3, 32, 32)), device="meta")
    with pytest.raises(ValueError, match="batch_size"):
        embed_dataset(Tiny(), Pairs(torch.zeros(2, 3, 32, 32)), batch_size=0)
