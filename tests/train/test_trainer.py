"""The training loop: exact resume, divergence, accumulation, clipping, warm start, AMP, evaluation,
explicit seeding and host syncs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from broadface.models.checkpoint import load_backbone, load_checkpoint
from broadface.train.trainer import Trainer, TrainingDiverged, train


class Crash(Exception):
    pass


def crash_at(step: int):
    def callback(kind, record):
        if kind == "train" and record["step"] == step:
            raise Crash(f"simulated crash at step {step}")
    return callback


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Bit-identical nested state (tensors compared exactly, NaN-free)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class DropoutNet(nn.Module):
    """tinycnn + dropout on the embedding: training draws from the global torch RNG every step."""

    def __init__(self):
        super().__init__()
        from broadface.models import build_model

        self.body = build_model("tinycnn", embedding_size=16, input_size=28, width=16)
        self.drop = nn.Dropout(0.3)
        self.config = self.body.config

    def forward(self, x):
        return self.drop(self.body(x))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(tmp_path, faces, val_faces, make_config, workers):
    """N steps straight == k steps, crash, resume, N-k steps (BroadFace queue, random flips, dropout,
    evaluation on, warm-up + multistep, clipping)."""
    opts = ["head.queue_size=20", f"data.num_workers={workers}", "train.steps=8", "schedule.warmup_steps=2",
            "schedule.milestones=[5]", "optim.clip_grad=5.0", "train.eval_every=3"]

    def trainer(out, *extra, **kw):
        torch.manual_seed(0)  # an injected model is used as given: same initial weights in every run
        return Trainer(make_config(out, *opts, *extra), train_set=faces, val_set=val_faces, model=DropoutNet(),
                       progress=False, **kw)

    straight = trainer(tmp_path / "a").fit()
    with pytest.raises(Crash):  # dies after step 5; the last checkpoint is step 4
        trainer(tmp_path / "b", callbacks=[crash_at(5)]).fit()
    assert not (tmp_path / "b" / "final.pt").exists()
    torch.manual_seed(1234)  # a resumed process starts from other RNG states
    resumed = trainer(tmp_path / "b", "train.resume=auto")
    assert resumed.step == 4 and resumed.stream.position == {"epoch": 0, "batch": 4}
    result = resumed.fit()

    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(result.checkpoint)
    assert a["step"] == b["step"] == 8 and a["data"] == b["data"] == {"epoch": 1, "batch": 2}
    assert a["head"]["queue._extra_state"]["fill"] == 20  # the queue is full and wrapped
    for key in ("backbone", "head", "optimizer", "scheduler", "rng"):
        assert_same_state(a[key], b[key], key)
    # the resumed run logged steps 5..8 and evaluated at 6 and 8 with the straight run's values
    key = ("step", "batch_loss", "union_loss", "lr", "queue_fill", "compensation_norm", "grad_norm")
    assert [[r[k] for k in key] for r in straight.history if r["step"] > 4] == [[r[k] for k in key]
                                                                                for r in result.history]
    assert [e for e in straight.evals if e["step"] > 4] == result.evals


def test_different_seed_changes_weights(tmp_path, faces, make_config):
    """Guard for the test above: the comparison can fail."""
    a = Trainer(make_config(None, "train.steps=2"), train_set=faces, progress=False)
    a.fit()
    b = Trainer(make_config(None, "train.steps=2", "train.seed=1"), train_set=faces, progress=False)
    b.fit()
    assert not torch.equal(a.model.state_dict()["fc.weight"], b.model.state_dict()["fc.weight"])


class PoisonOnStep:
    """Dataset wrapper whose images become NaN once ``armed`` (set by a callback)."""

    def __init__(self, dataset):
        self.dataset, self.armed = dataset, False
        self.classes = dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (torch.full_like(x, float("nan")) if self.armed else x), y


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, faces, make_config):
    data = PoisonOnStep(faces)

    def arm(kind, record):
        if record["step"] == 5:
            data.armed = True

    cfg = make_config(tmp_path, "head.queue_size=16", "train.checkpoint_every=4")
    with pytest.raises(TrainingDiverged, match=r"step 6: non-finite loss") as err:
        Trainer(cfg, train_set=data, progress=False, callbacks=[arm]).fit()
    good = tmp_path / "checkpoints" / "step_0000004.pt"
    assert str(good) in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004.pt"]
    assert not (tmp_path / "final.pt").exists()
    ckpt = load_checkpoint(good)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["backbone"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


class PoisonAfter:
    """Dataset wrapper: images become NaN after ``clean`` fetches (num_workers=0: in step order)."""

    def __init__(self, dataset, clean):
        self.dataset, self.clean, self.fetched = dataset, clean, 0
        self.classes = dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        self.fetched += 1
        return (torch.full_like(x, float("nan")) if self.fetched > self.clean else x), y


def test_non_finite_step_is_never_applied_and_reported_at_the_next_log(tmp_path, faces, make_config):
    """Steps 6 and 7 are NaN, the loop syncs at step 8: the error names step 6 and every weight, optimizer
    buffer and queue entry is exactly that of a run that stopped after step 5."""
    opts = ["head.queue_size=20", "train.steps=8", "train.log_every=4", "train.checkpoint_every=4",
            "optim.clip_grad=5.0"]
    ref = Trainer(make_config(None, *opts, "train.steps=5"), train_set=faces, progress=False)
    ref.fit()
    tr = Trainer(make_config(tmp_path, *opts), train_set=PoisonAfter(faces, clean=5 * 8), progress=False)
    with pytest.raises(TrainingDiverged, match=r"step 6: non-finite.*the weights are those of step 5"):
        tr.fit()
    assert tr.step == 8  # it ran on to the sync point ...
    assert_same_state(ref.model.state_dict(), tr.model.state_dict(), "backbone")  # ... without applying anything
    assert torch.equal(ref.head.weight, tr.head.weight)
    for name in ("vectors", "scales", "labels"):
        assert torch.equal(getattr(ref.head.queue, name), getattr(tr.head.queue, name)), name
    assert_same_state(ref.optimizer.state_dict()["state"], tr.optimizer.state_dict()["state"], "optimizer")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004.pt"]
    with pytest.raises(TrainingDiverged):
        tr.save_checkpoint()  # a diverged run writes nothing


class LinearNet(nn.Module):
    """BN-free backbone, so micro-batches and the full batch give the same gradient."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = nn.Linear(3 * 28 * 28, dim)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("queue", [0, 32])
def test_gradient_accumulation_matches_full_batch(faces, make_config, queue):
    def run(batch, accum):
        torch.manual_seed(0)
        cfg = make_config(None, f"train.batch_size={batch}", f"train.grad_accum={accum}", "train.steps=1",
                          f"head.queue_size={queue}", "optim.momentum=0.0", "optim.weight_decay=0.0")
        t = Trainer(cfg, train_set=faces, model=LinearNet(), progress=False)
        t.fit()
        return t

    full, accum = run(8, 1), run(4, 2)
    for (name, p), q in zip(full.model.named_parameters(), accum.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(full.head.margin.weight, accum.head.margin.weight, rtol=1e-5, atol=1e-6)
    if queue:  # both enqueued the same 8 embeddings, in the same order
        assert int(accum.head.queue.fill) == 8
        torch.testing.assert_close(full.head.queue.vectors, accum.head.queue.vectors, rtol=1e-5, atol=1e-6)
    # the accumulated step really summed two halves (not just the last micro-batch)
    half = run(4, 1)
    assert not torch.allclose(half.model.fc.weight, full.model.fc.weight, atol=1e-6)


def test_clip_grad_bounds_backbone_gradient(faces, make_config):
    t = Trainer(make_config(None, "optim.clip_grad=0.01", "train.steps=1"), train_set=faces, progress=False)
    result = t.fit()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()]))
    assert result.history[0]["grad_norm"] > 0.01  # the raw norm was larger: clipping acted
    assert float(norm) <= 0.01 * (1 + 1e-4)


def test_warm_start_loads_backbone_and_classifier(tmp_path, faces, make_faces, make_config):
    first = train(make_config(tmp_path / "a", "train.steps=2"), train_set=faces, progress=False)
    t = Trainer(make_config(None, f"train.init={first.checkpoint}", "head.queue_size=16"), train_set=faces,
                progress=False)
    src = load_checkpoint(first.checkpoint)
    assert_same_state(src["backbone"], t.model.state_dict())
    assert torch.equal(src["head"]["margin.weight"], t.head.margin.weight)
    assert int(t.head.queue.fill) == 0 and t.step == 0  # fresh queue and schedule

    other = make_faces(40, 5, 4, flip=True)  # 5 classes, not 8
    with pytest.raises(ValueError, match=r"classifier has shape \(8, 16\).*needs \(5, 16\)"):
        Trainer(make_config(None, f"train.init={first.checkpoint}"), train_set=other, progress=False)
    t = Trainer(make_config(None, f"train.init={first.checkpoint}", "train.init_head=false"), train_set=other,
                progress=False)
    assert_same_state(src["backbone"], t.model.state_dict())
    with pytest.raises(ValueError, match="differs from this run's model"):
        Trainer(make_config(None, f"train.init={first.checkpoint}", "model.embedding_size=8"), train_set=faces,
                progress=False)


def test_checkpoint_contents_and_load_backbone(tmp_path, faces, make_config):
    result = train(make_config(tmp_path, "train.keep_checkpoints=2"), train_set=faces, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000004.pt", "step_0000006.pt"]  # older ones pruned
    assert result.checkpoint == tmp_path / "final.pt"
    ckpt = load_checkpoint(result.checkpoint)  # weights_only=True
    assert {"model", "backbone", "head", "optimizer", "scheduler", "scaler", "rng", "data", "step",
            "config"} <= set(ckpt)
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    model = load_backbone(result.checkpoint)
    x = torch.randn(2, 3, 28, 28)
    t = Trainer(make_config(None, f"train.resume={result.checkpoint}"), train_set=faces, progress=False)
    with torch.no_grad():
        assert torch.equal(model(x), t.model.eval()(x))


@pytest.mark.parametrize("micro", ["null", 4])
def test_bf16_autocast_on_cpu(faces, make_config, micro):
    """train.amp=bf16 runs the backbone in bfloat16 (both passes of micro-batching too); the head stays fp32."""
    cfg = make_config(None, "train.amp=bf16", "head.queue_size=16", "train.steps=3", f"train.micro_batch={micro}")
    tr = Trainer(cfg, train_set=faces, progress=False)
    dtypes = []
    tr.model.fc.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    result = tr.fit()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert tr.head.stats.batch_loss.dtype == torch.float32 and tr.head.stats.union_loss.dtype == torch.float32
    assert all(math.isfinite(r["batch_loss"]) and math.isfinite(r["union_loss"]) for r in result.history)
    plain = train(make_config(None, "head.queue_size=16", "train.steps=3", f"train.micro_batch={micro}"),
                  train_set=faces, progress=False)
    assert result.history[0]["batch_loss"] != plain.history[0]["batch_loss"]  # bf16 rounding is visible ...
    assert result.history[0]["batch_loss"] == pytest.approx(plain.history[0]["batch_loss"], rel=0.05)  # ... only


def test_fp16_on_cpu_is_refused(faces, make_config):
    with pytest.raises(ValueError, match="train.amp='fp16'.*need a CUDA device"):
        Trainer(make_config(None, "train.amp=fp16", "train.device=cpu"), train_set=faces, progress=False)
    with pytest.raises(ValueError, match="config train.device='tpu'.*expected auto, cpu, cuda"):
        Trainer(make_config(None, "train.device=tpu"), train_set=faces, progress=False)


def reference_recall(model, images, labels, ks=(1, 2, 4, 8)):
    """Recall@K written from its definition: flip-summed L2-normalised embeddings, every image queries
    all others, a hit when one of its k nearest shares its label."""
    model.eval()
    with torch.no_grad():
        e = (model(images) + model(images.flip(3))).double()
    e = e / e.norm(dim=1, keepdim=True)
    sim = e @ e.t()
    sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)
    return {k: (labels[order[:, :k]] == labels[:, None]).any(1).double().mean().item() for k in ks}


def test_evaluate_scores_the_held_out_identities(faces, val_faces, make_faces, make_config):
    tr = Trainer(make_config(None, "train.steps=3"), train_set=faces, val_set=val_faces, progress=False)
    tr.fit()
    got = tr.evaluate()
    val = [val_faces[i] for i in range(len(val_faces))]
    ref = reference_recall(tr.model, torch.stack([x for x, _ in val]), torch.tensor([y for _, y in val]))
    assert got["step"] == 3
    assert [got[f"val_recall@{k}"] for k in (1, 2, 4, 8)] == pytest.approx([ref[k] for k in (1, 2, 4, 8)], abs=1e-9)
    seen = make_faces(0, 8, 6, flip=False)  # the training identities: the same measure differs there
    on_train = [seen[i] for i in range(len(seen))]
    other = reference_recall(tr.model, torch.stack([x for x, _ in on_train]), torch.tensor([y for _, y in on_train]))
    assert [other[k] for k in (1, 2, 4, 8)] != pytest.approx([ref[k] for k in (1, 2, 4, 8)], abs=1e-3)


def test_evaluation_reports_recall(faces, val_faces, make_config):
    result = train(make_config(None, "train.steps=4", "train.eval_every=2"), train_set=faces, val_set=val_faces,
                   progress=False)
    assert [e["step"] for e in result.evals] == [2, 4]
    assert result.metric("val_recall@1")[-1][0] == 4


def test_seeding_is_explicit(faces, make_config):
    """The constructor draws the initial weights from train.seed without touching the caller's RNG;
    fit() seeds the global RNG (dropout) from train.seed whatever the caller did before."""
    cfg = make_config(None, "train.steps=2")
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    a = Trainer(cfg, train_set=faces, progress=False)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(2)
    b = Trainer(cfg, train_set=faces, progress=False)
    assert_same_state(a.model.state_dict(), b.model.state_dict(), "initial backbone")
    assert torch.equal(a.head.weight, b.head.weight)
    runs = []
    for caller_seed in (3, 4):
        torch.manual_seed(0)
        tr = Trainer(cfg, train_set=faces, model=DropoutNet(), progress=False)
        torch.manual_seed(caller_seed)
        tr.fit()
        runs.append(tr.model.state_dict())
    assert_same_state(runs[0], runs[1], "trained backbone")


def test_history_lr_follows_schedule(faces, make_config):
    result = train(make_config(None, "schedule.warmup_steps=2", "schedule.milestones=[4]", "schedule.gamma=0.1"),
                   train_set=faces, progress=False)
    lrs = [r["lr"] for r in result.history]
    assert lrs == pytest.approx([0.025, 0.05, 0.05, 0.05, 0.005, 0.005])
    assert [r["step"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.checkpoint is None and result.summary["status"] == "completed"


def test_resume_errors_and_auto_without_checkpoint(tmp_path, faces, make_config):
    fresh = Trainer(make_config(tmp_path, "train.resume=auto", "head.queue_size=16", "train.steps=2"),
                    train_set=faces, progress=False)
    assert fresh.step == 0  # nothing to resume yet: starts from scratch
    fresh.fit()
    ckpt = tmp_path / "checkpoints" / "step_0000002.pt"
    with pytest.raises(ValueError, match=r"step_0000002.pt: checkpoint does not match this config"):
        Trainer(make_config(None, f"train.resume={ckpt}", "head.queue_size=32", "train.steps=2"), train_set=faces,
                progress=False)
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        Trainer(make_config(None, f"train.resume={tmp_path / 'nope.pt'}"), train_set=faces, progress=False)
    with pytest.raises(ValueError, match="train.init"):
        make_config(None, f"train.resume={ckpt}", f"train.init={ckpt}").validate()


def test_fresh_run_refuses_an_output_with_checkpoints(tmp_path, faces, make_config):
    train(make_config(tmp_path, "train.steps=2"), train_set=faces, progress=False)
    with pytest.raises(ValueError,
                       match=r"holds the results of another run \(checkpoints, final.pt.*train.resume=auto"):
        Trainer(make_config(tmp_path, "train.steps=4"), train_set=faces, progress=False)


def test_diagnostics_queue_holds_the_sample_ids_of_the_last_steps(faces, make_config):
    """head.diagnostics: each queued entry knows which training sample it is and how many steps ago it came."""
    from broadface.data.loader import epoch_order

    tr = Trainer(make_config(None, "head.queue_size=20", "head.diagnostics=true", "head.storage=full",
                             "train.steps=4"), train_set=faces, progress=False)
    tr.fit()
    d = tr.head.diagnostics()
    order = epoch_order(len(faces), tr.cfg.train.seed, 0)  # batch b of epoch 0 is order[8b:8b+8]
    assert d.ids.tolist() == order[12:32].tolist()  # 4 steps x 8 pushed, the newest 20 kept, oldest first
    assert d.ages.tolist() == [2] * 4 + [1] * 8 + [0] * 8
    assert d.labels.tolist() == [faces.targets[i] for i in d.ids.tolist()]


@pytest.fixture
def celeba_folder(tmp_path):
    """6 real CelebA-299 identities x 4 faces (112 px JPEGs), linked into ``tmp_path/train``."""
    from broadface.data.folder import list_classes, list_images
    from broadface.paths import data_root

    src = data_root() / "celeba299" / "aligned-112x112"
    for c in sorted(list_classes(src), key=int)[:6]:
        (tmp_path / "train" / c).mkdir(parents=True)
        for f in list_images(src / c)[:4]:
            (tmp_path / "train" / c / f).symlink_to(src / c / f)
    return tmp_path / "train"


def test_the_trainer_loads_through_the_batched_fetch_on_data_threads(celeba_folder, make_config):
    opts = ["data.name=folder", f"data.root={celeba_folder}", "model.input_size=112", "data.threads=3"]
    loader = Trainer(make_config(None, *opts), progress=False)._loader(0, 0)
    assert loader.dataset._batched and loader.dataset.threads == 3
    with pytest.raises(ValueError, match="data.threads"):
        make_config(None, "data.threads=0").validate()


def test_configured_data_trains_on_uint8_batches_as_on_float_images(tmp_path, celeba_folder, make_config,
                                                                   monkeypatch):
    """The configured data sets hand the step uint8 pixels (normalised there, a batch at a time, with constants
    built once per run: on a GPU a build syncs): the same run, bit for bit, as the same images injected as floats."""
    from broadface.data import FaceFolder, FaceTransform, pipeline

    opts = ["data.name=folder", f"data.root={tmp_path / 'train'}", "train.steps=4", "head.queue_size=16"]
    configured = Trainer(make_config(None, *opts), progress=False)
    images, _ = next(iter(configured._loader(0, 0)))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 28, 28)
    built, real = [], pipeline._batch_constants
    monkeypatch.setattr(pipeline, "_batch_constants", lambda *a: built.append(a) or real(*a))
    a = configured.fit()
    assert len(built) == 1  # four steps, one build
    floats = FaceFolder(tmp_path / "train", FaceTransform(28, flip_p=0.5))
    injected = Trainer(make_config(None, *opts), train_set=floats, progress=False)
    assert next(iter(injected._loader(0, 0)))[0].dtype == torch.float32
    b = injected.fit()
    assert len(a.history) == 4 and [r["batch_loss"] for r in a.history] == [r["batch_loss"] for r in b.history]
    assert_same_state(configured.model.state_dict(), injected.model.state_dict(), "backbone")
    assert_same_state(configured.head.state_dict(), injected.head.state_dict(), "head")
