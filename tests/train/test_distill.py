"""Distillation: loss values and gradients, projection, teacher cache, ONNX teacher, unlabeled
images, masked-face augmentation, and exact resume with masks + distillation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from broadface.data.folder import FaceFolder
from broadface.data.seeding import generator_for
from broadface.data.transforms import EvalTransform, FaceTransform
from broadface.models import build_model
from broadface.models.checkpoint import load_checkpoint
from broadface.train.distill import Distiller, distill_loss
from broadface.train.distill_data import DistillDataset, fingerprint
from broadface.train.teacher import load_teacher, module_teacher, onnx_teacher
from broadface.train.teacher_cache import build_cache, open_cache, sidecar_path
from broadface.train.trainer import Trainer
from tests.helpers import save_backbone

from .test_trainer import Crash, LinearNet, assert_same_state, crash_at


def save_teacher(path, seed=7, dim=24):
    """A tinycnn checkpoint (28x28, D=dim) as a teacher file."""
    torch.manual_seed(seed)
    model = build_model("tinycnn", embedding_size=dim, input_size=28, width=8)
    save_backbone(model, path)
    return path


def with_transform(faces: FaceFolder, tf) -> FaceFolder:
    return FaceFolder.from_samples(faces.samples, faces.classes, transform=tf)


# ----------------------------------------------------------------------------- the loss


def test_distill_loss_values_and_gradients_match_hand_computation():
    s = torch.tensor([[3.0, 4.0], [0.0, -2.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    # row 0: cos = 0.6; row 1: cos = -1
    assert distill_loss(s, t, "cosine").item() == pytest.approx(((1 - 0.6) + (1 + 1)) / 2)
    assert distill_loss(s, t, "l2").item() == pytest.approx((2 - 2 * 0.6 + 2 + 2) / 2)
    distill_loss(s, t, "cosine").backward()
    # d(1 - ŝ·t̂)/ds = -(t̂ - (ŝ·t̂) ŝ) / |s|, halved by the batch mean
    s_hat, t_hat = torch.tensor([0.6, 0.8]), torch.tensor([1.0, 0.0])
    expect0 = -(t_hat - 0.6 * s_hat) / 5 / 2
    assert torch.allclose(s.grad[0], expect0, atol=1e-6)
    assert torch.allclose(s.grad[1], torch.zeros(2), atol=1e-6)  # antipodal: the tangent part vanishes
    s.grad = None
    distill_loss(s, t, "l2").backward()
    assert torch.allclose(s.grad[0], 2 * expect0, atol=1e-6)  # |ŝ - t̂|² = 2 - 2 cos
    with pytest.raises(ValueError, match="distill.kind"):
        distill_loss(s, t, "kl")


def test_projection_when_dimensions_differ(tmp_path):
    teacher = load_teacher(save_teacher(tmp_path / "t.pt", dim=24))
    assert (teacher.dim, teacher.input_size) == (24, 28)
    d = Distiller(teacher, student_dim=16)
    assert isinstance(d.projection, torch.nn.Linear) and tuple(d.projection.weight.shape) == (24, 16)
    emb = torch.randn(4, 16, requires_grad=True)
    d.term(emb, torch.randn(4, 3, 28, 28)).backward()
    assert d.projection.weight.grad is not None and emb.grad.abs().sum() > 0
    assert set(d.state_dict()) == {"projection.weight"}  # the teacher is not part of the state
    same = Distiller(teacher, student_dim=24)
    assert isinstance(same.projection, torch.nn.Identity) and not same.state_dict()


# ----------------------------------------------------------------------------- teachers


def test_onnx_teacher_equals_pytorch_teacher(tmp_path):
    pytest.importorskip("onnxruntime")
    from broadface.infer.export import export_onnx

    torch.manual_seed(0)
    model = build_model("tinycnn", embedding_size=24, input_size=28, width=8).eval()
    path = export_onnx(model, tmp_path / "t.onnx")
    on, pt = onnx_teacher(path, fallback_size=99), module_teacher(model)
    assert on.input_size == 28 and on.dim == pt.dim == 24  # read from the ONNX input shape
    x = torch.rand(5, 3, 28, 28) * 2 - 1
    assert torch.allclose(on(x), pt(x), atol=1e-5)
    big = torch.rand(3, 3, 56, 56) * 2 - 1  # resized to the teacher's input size first
    assert torch.allclose(on(big), pt(big), atol=1e-5)
    assert torch.allclose(pt(x).norm(dim=1), torch.ones(5))


def test_teacher_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_teacher(tmp_path / "missing.pt")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="bad.onnx"):
        load_teacher(bad)


# ----------------------------------------------------------------------------- cache


def test_cache_keys_follow_the_applied_flip(faces):
    data = DistillDataset(faces)
    plain = EvalTransform(28)
    flips = []
    for i in range(len(faces)):
        image, label, key = data.getitem(i, generator_for("sample", 0, 0, i))
        assert key // 2 == i and label == faces.targets[i]
        ref = plain(faces.image(i)[0])
        assert torch.equal(image, ref.flip(-1) if key % 2 else ref)
        flips.append(key % 2)
    assert 0 < sum(flips) < len(flips)  # both views occur


def test_cache_round_trip_and_stale_cache_is_refused(tmp_path, faces, make_faces):
    teacher = load_teacher(save_teacher(tmp_path / "t.pt"))
    identity = {**teacher.identity, "dataset": fingerprint([faces])}
    path = tmp_path / "cache" / "teacher.npy"
    cache = build_cache(path, teacher, [faces], identity, batch_size=7, dtype="float32")
    assert isinstance(cache, np.memmap) and cache.shape == (len(faces), 2, 24)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["dataset"]["count"] == len(faces) and meta["input_size"] == 28
    x = torch.stack([EvalTransform(28)(faces.image(i)[0]) for i in range(len(faces))])
    assert np.allclose(cache[:, 0], teacher(x).numpy(), atol=1e-6)
    assert np.allclose(cache[:, 1], teacher(x.flip(-1)).numpy(), atol=1e-6)
    again = open_cache(path, identity, "float32")
    assert np.array_equal(again, cache)
    assert not list(path.parent.glob(".*tmp"))  # no temporary file left behind

    other = load_teacher(save_teacher(tmp_path / "t2.pt", seed=8))
    with pytest.raises(ValueError, match="stale.*teacher_sha256"):
        open_cache(path, {**other.identity, "dataset": identity["dataset"]}, "float32")
    fewer = make_faces(0, 8, 5, flip=True)
    with pytest.raises(ValueError, match="stale.*'dataset'"):
        open_cache(path, {**teacher.identity, "dataset": fingerprint([fewer])}, "float32")
    with pytest.raises(ValueError, match="stale.*'dtype'"):
        open_cache(path, identity, "float16")
    sidecar_path(path).unlink()
    with pytest.raises(ValueError, match="sidecar .* is missing"):
        open_cache(path, identity, "float32")


def test_trainer_uses_cache_rows(tmp_path, faces, make_config):
    teacher_file = save_teacher(tmp_path / "t.pt")
    cfg = make_config(None, f"distill.teacher={teacher_file}", f"distill.cache={tmp_path / 'c.npy'}",
                      "distill.cache_dtype=float32", "train.steps=1")
    tr = Trainer(cfg, train_set=faces, progress=False)
    images, labels, keys = next(tr.stream)
    direct = tr.distill.teacher(images)
    assert torch.allclose(tr.distill.targets(images, keys), direct, atol=1e-5)  # cache row == teacher on the view


# ----------------------------------------------------------------------------- unlabeled images


class HeadSpy:
    def __init__(self, head):
        self.seen, self.forward = [], head.forward
        head.forward = self

    def __call__(self, embeddings, labels, **kw):
        self.seen.append(labels.clone())
        return self.forward(embeddings, labels, **kw)


def test_unlabeled_images_only_feed_the_distillation_term(tmp_path, faces, make_config):
    teacher = load_teacher(save_teacher(tmp_path / "t.pt"))
    d = Distiller(teacher, student_dim=16, weight=9.0, unlabeled=True)
    from broadface.heads import BroadFace, CosFace

    head = BroadFace(CosFace(8, 16, scale=64.0, margin=0.4), queue_size=16)
    emb = torch.randn(6, 16, requires_grad=True)
    images = torch.rand(6, 3, 28, 28) * 2 - 1
    labels = torch.tensor([0, -1, 3, -1, 5, 1])
    loss, kept, kept_labels, _ = d(head, emb, labels, images)
    keep = labels >= 0
    expect = head(emb[keep], labels[keep], enqueue=False) + 9.0 * d.term(emb, images)
    assert torch.allclose(loss, expect) and torch.equal(kept_labels, labels[keep]) and kept.shape[0] == 4
    # all unlabeled: only the distillation term, the head untouched
    emb.grad = None
    loss, kept, kept_labels, term = d(head, emb, torch.full((6,), -1), images)
    assert torch.allclose(loss, 9.0 * d.term(emb, images)) and kept_labels.numel() == 0
    assert torch.allclose(term, d.term(emb, images))
    loss.backward()
    assert head.weight.grad is None
    fill = int(head.queue.fill)
    head.enqueue(kept.detach(), kept_labels)  # what the trainer does with an all-unlabeled micro-batch
    assert int(head.queue.fill) == fill

    # end to end: an unlabeled folder joins the data; the head never sees label -1
    root = tmp_path / "unlabeled"
    for i, (src, _) in enumerate(faces.samples[:10]):
        (root / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / f"sub{i % 2}" / f"img{i}.jpg")
    cfg = make_config(None, f"distill.teacher={tmp_path / 't.pt'}", f"distill.unlabeled_root={root}",
                      "head.queue_size=16", "train.steps=4")
    tr = Trainer(cfg, train_set=faces, progress=False)
    assert len(tr.train_set) == len(faces) + 10
    spy = HeadSpy(tr.head)
    result = tr.fit()
    seen = torch.cat(spy.seen)
    assert seen.numel() < 4 * 8 and (seen >= 0).all()  # unlabeled images were in the batches, not in the head
    assert (tr.head.queue.labels[tr.head.queue.valid()] >= 0).all()
    assert all(r["distill_loss"] > 0 for r in result.history)


# ----------------------------------------------------------------------------- masks


def test_mask_prob_is_deterministic_per_sample(faces):
    img = faces.image(0)[0]
    masked = FaceTransform(28, flip_p=0.5, mask_prob=1.0)
    a, b = masked(img, generator_for(1)), masked(img, generator_for(1))
    assert torch.equal(a, b)
    plain = FaceTransform(28)(img)
    assert not torch.equal(a, plain) and not torch.equal(a, plain.flip(-1))
    assert not torch.equal(masked(img, generator_for(2)), a)
    g = generator_for(3)
    state = g.get_state()
    FaceTransform(28, mask_prob=0.0)(img, g)
    assert torch.equal(g.get_state(), state)  # mask_prob 0 draws nothing: old streams unchanged
    frac = np.mean([not torch.equal(FaceTransform(28, mask_prob=0.35)(img, generator_for(i)), plain)
                    for i in range(60)])
    assert 0.15 < frac < 0.55
    with pytest.raises(ValueError, match="mask_prob"):
        FaceTransform(28, mask_prob=1.5)


def test_mask_prob_config_and_injected_set(faces, make_config):
    with pytest.raises(ValueError, match="data.mask_prob"):
        make_config(None, "data.mask_prob=2").validate()
    with pytest.raises(ValueError, match="mask_prob=0.35"):
        Trainer(make_config(None, "data.mask_prob=0.35"), train_set=faces, progress=False)
    ok = with_transform(faces, FaceTransform(28, flip_p=0.5, mask_prob=0.35))
    Trainer(make_config(None, "data.mask_prob=0.35"), train_set=ok, progress=False)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_is_bit_identical_with_masks_and_distillation(tmp_path, faces, make_config, cache):
    """6 steps straight == crash after step 3, resume from step 2's checkpoint (masks, flips, BroadFace queue,
    projection 16 -> 24, on-the-fly teacher or cache)."""
    masked = with_transform(faces, FaceTransform(28, flip_p=0.5, mask_prob=0.5))
    teacher = save_teacher(tmp_path / "t.pt")
    opts = [f"distill.teacher={teacher}", "distill.kind=l2", "data.mask_prob=0.5", "head.loss=cosface",
            "head.margin=0.4", "head.queue_size=12", "train.steps=6", "optim.clip_grad=5.0"]
    if cache:
        opts.append(f"distill.cache={tmp_path / 'cache.npy'}")

    def trainer(out, *extra, **kw):
        torch.manual_seed(0)
        return Trainer(make_config(out, *opts, *extra), train_set=masked, progress=False, **kw)

    straight = trainer(tmp_path / "a").fit()
    with pytest.raises(Crash):
        trainer(tmp_path / "b", callbacks=[crash_at(3)]).fit()
    torch.manual_seed(99)
    resumed = trainer(tmp_path / "b", "train.resume=auto")
    assert resumed.step == 2
    result = resumed.fit()
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(result.checkpoint)
    assert set(a["distill"]) == {"projection.weight"}
    assert [g["name"] for g in a["optimizer"]["param_groups"]][-1] == "distill"
    for key in ("backbone", "head", "optimizer", "scheduler", "rng", "distill"):
        assert_same_state(a[key], b[key], key)
    fields = ("step", "batch_loss", "union_loss", "distill_loss", "grad_norm")
    assert ([[r[k] for k in fields] for r in straight.history if r["step"] > 2]
            == [[r[k] for k in fields] for r in result.history])
    # guard: the projection did train
    init = trainer(None, "train.steps=1")
    assert not torch.equal(init.distill.projection.weight.detach(), a["distill"]["projection.weight"])


def test_micro_batching_combines_with_distillation(tmp_path, faces, make_config):
    """train.micro_batch runs the student in slices under one whole-batch objective (head + λ·d): with a
    backbone without batch statistics the step equals the plain one, projection included."""
    opts = [f"distill.teacher={save_teacher(tmp_path / 't.pt')}", "head.queue_size=16", "train.steps=2",
            "optim.momentum=0.0"]

    def run(*extra):
        torch.manual_seed(0)
        tr = Trainer(make_config(None, *opts, *extra), train_set=faces, model=LinearNet(), progress=False)
        calls = []
        tr.model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
        result = tr.fit()
        tr.calls = calls
        return tr, result

    (a, ra), (b, rb) = run(), run("train.micro_batch=3")
    assert a.calls == [8, 8] and b.calls == [3, 3, 2] * 4  # 2 steps x (no-grad pass, recompute pass)
    assert [r["distill_loss"] for r in ra.history] == pytest.approx([r["distill_loss"] for r in rb.history], rel=1e-5)
    for p, q in zip(list(a.model.parameters()) + list(a.distill.parameters()),
                    list(b.model.parameters()) + list(b.distill.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.distill.projection.weight, run("train.steps=1")[0].distill.projection.weight)


def test_distill_config_errors(tmp_path, faces, make_config):
    with pytest.raises(ValueError, match="distill.kind"):
        make_config(None, "distill.kind=kl")
    with pytest.raises(ValueError, match="distill.weight"):
        make_config(None, "distill.weight=-1").validate()
    with pytest.raises(ValueError, match="need distill.teacher"):
        Trainer(make_config(None, f"distill.cache={tmp_path / 'c.npy'}"), train_set=faces, progress=False)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        Trainer(make_config(None, f"distill.teacher={tmp_path / 'nothere.pt'}"), train_set=faces, progress=False)
    with pytest.raises(FileNotFoundError, match="distill.unlabeled_root"):
        Trainer(make_config(None, f"distill.teacher={save_teacher(tmp_path / 't.pt')}",
                            f"distill.unlabeled_root={tmp_path / 'none'}"), train_set=faces, progress=False)
    plain = Trainer(make_config(None), train_set=faces, progress=False)  # distillation off: nothing changes
    assert plain.distill is None and plain.train_set is faces and "distill" not in plain.state_dict()
