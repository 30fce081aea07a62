"""The resume guard: a checkpoint continues only the run that wrote it. A change of what the run is
(data, seed, loss, margin, flip, optimizer, storage, model) is refused with the list of keys; keys a user
may change (steps, lr, ...) pass only when named in train.resume_allow."""
from __future__ import annotations

import pytest

from broadface.train.trainer import Trainer, train


@pytest.fixture
def finished(tmp_path, faces, make_config):
    """A 2-step run with a queue; returns its output folder."""
    train(make_config(tmp_path, "train.steps=2", "head.queue_size=16"), train_set=faces, progress=False)
    return tmp_path


def resume(make_config, out, data, *overrides):
    return Trainer(make_config(out, "train.steps=2", "head.queue_size=16", "train.resume=auto", *overrides),
                   train_set=data, progress=False)


@pytest.mark.parametrize("override, key", [
    ("train.seed=1", "train.seed 0 -> 1"),
    ("head.loss=cosface", "head.loss 'arcface' -> 'cosface'"),
    ("head.margin=0.3", "head.margin 0.2 -> 0.3"),
    ("data.flip=false", "data.flip True -> False"),
    ("optim.name=adamw", "optim.name 'sgd' -> 'adamw'"),
    ("head.storage=full", "head.storage 'compact' -> 'full'"),
    ("model.kwargs={width: 8}", "model.kwargs {'width': 16} -> {'width': 8}"),
])
def test_a_change_of_what_the_run_is_is_refused_with_the_key(finished, faces, make_config, override, key):
    before = (finished / "config.yaml").read_text()
    with pytest.raises(ValueError, match="define the run and cannot change") as err:
        resume(make_config, finished, faces, override)
    assert key in str(err.value) and "step_0000002.pt" in str(err.value)
    assert (finished / "config.yaml").read_text() == before  # nothing was overwritten


def test_other_identities_of_the_same_count_are_refused(finished, make_faces, make_config):
    other = make_faces(100, 8, 6, flip=True)  # 8 other CelebA identities, 6 images each: same shapes
    with pytest.raises(ValueError, match=r"data.classes .*other identities of the same count"):
        resume(make_config, finished, other)


def test_another_class_count_is_refused_before_loading(finished, make_faces, make_config):
    with pytest.raises(ValueError, match=r"data.classes .*8 -> 5 classes"):
        resume(make_config, finished, make_faces(40, 5, 4, flip=True))


def test_steps_and_lr_may_change_when_allowed(finished, faces, make_config):
    with pytest.raises(ValueError, match=r"may change if you say so \(train.resume_allow=\[optim.lr,train.steps\]\)"
                                         r": optim.lr 0.05 -> 0.01; train.steps 2 -> 4"):
        resume(make_config, finished, faces, "train.steps=4", "optim.lr=0.01")
    tr = resume(make_config, finished, faces, "train.steps=4", "optim.lr=0.01",
                "train.resume_allow=[train.steps, optim.lr]")
    assert tr.step == 2 and tr.checkpoints.changes == ["optim.lr 0.05 -> 0.01", "train.steps 2 -> 4"]
    assert tr.fit().summary["step"] == 4


def test_bookkeeping_keys_change_freely(finished, faces, make_config):
    tr = resume(make_config, finished, faces, "train.log_every=5", "train.keep_checkpoints=2", "data.num_workers=1",
                "head.chunk_size=3")
    assert tr.step == 2 and tr.checkpoints.changes == []


def test_allow_list_names_adjustable_keys_only(make_config):
    with pytest.raises(ValueError, match=r"'train.seed' cannot be allowed to change on resume; allowed: .*train.steps"):
        make_config(None, "train.resume_allow=[train.seed]").validate()


def test_key_kinds_are_disjoint_and_unknown_keys_are_guarded():
    from broadface.train.guard import ADJUSTABLE, IGNORED, check_resume, config_changes

    assert not IGNORED & ADJUSTABLE
    theirs = {"head": {"new_margin_option": 1}, "train": {"output": "a"}}
    ours = {"head": {"new_margin_option": 2}, "train": {"output": "b"}}
    assert config_changes(theirs, ours) == [("head.new_margin_option", 1, 2)]  # a key added later is guarded
    with pytest.raises(ValueError, match="head.new_margin_option 1 -> 2"):
        check_resume({"config": theirs}, ours, None, [], "x.pt")


def test_fingerprint_follows_the_class_list(faces, make_faces):
    from broadface.train.guard import data_fingerprint

    a, b = data_fingerprint(faces), data_fingerprint(make_faces(0, 8, 6, flip=False))
    assert a == b and a["num_classes"] == 8 and a["num_images"] == 48  # same identities, other transform
    assert data_fingerprint(make_faces(100, 8, 6, flip=True))["classes_sha256"] != a["classes_sha256"]
    assert data_fingerprint(object()) is None
