"""Runs that train but likely not as meant say so: one class, a queue larger than the data set, skipped
images (counted and listed in summary.json and train.log)."""
from __future__ import annotations

import json
import shutil

import pytest

from broadface.data.folder import FaceFolder
from broadface.data.transforms import FaceTransform
from broadface.train.trainer import Trainer, train


def test_a_single_class_warns(tmp_path, small_folder, make_config):
    one = tmp_path / "one"
    shutil.copytree(small_folder / "Al_Gore", one / "Al_Gore")
    with pytest.warns(UserWarning, match="single class: every margin loss is exactly 0"):
        tr = Trainer(make_config(tmp_path / "run", "train.batch_size=2", "train.steps=2"),
                     train_set=FaceFolder(one, FaceTransform(size=28)), progress=False)
    assert tr.fit().history[-1]["batch_loss"] == 0.0  # what the warning is about
    assert "single class" in (tmp_path / "run" / "train.log").read_text()


def test_a_queue_larger_than_the_data_set_warns(faces, make_config):
    with pytest.warns(UserWarning, match=r"head.queue_size=96 .* exceeds the 48 training images: .* about 2 stale"):
        Trainer(make_config(None, "head.queue_size=96"), train_set=faces, progress=False)


def test_no_warning_for_an_ordinary_run(faces, make_config, recwarn):
    from broadface.train.trainer import TrainingWarning

    Trainer(make_config(None, "head.queue_size=16"), train_set=faces, progress=False)
    assert not [w for w in recwarn if issubclass(w.category, TrainingWarning)]


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_images_are_counted_and_listed(tmp_path, small_folder, make_config, workers):
    broken = small_folder / "Al_Gore" / "Al_Gore_9999.jpg"
    broken.write_bytes(b"not a jpeg")
    data = FaceFolder(small_folder, FaceTransform(size=28), on_error="skip")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) .*Al_Gore_9999.jpg"):
        result = train(make_config(tmp_path / "run", "train.batch_size=2", "train.steps=6",
                                   f"data.num_workers={workers}"), train_set=data, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == {"count": 1, "files": [str(broken)]} == result.summary["skipped_images"]
    assert str(broken) in (tmp_path / "run" / "train.log").read_text()
