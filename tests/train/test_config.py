"""Config loading: presets, strict keys and types, overrides, YAML round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from broadface.train.config import Config, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_presets_load_and_validate(path):
    cfg = load_config(path).validate()
    assert cfg.train.steps > 0 and cfg.model.name


def test_paper_preset_matches_the_paper():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "paper_ms1m_r100.yaml")
    assert (cfg.model.name, cfg.model.embedding_size) == ("iresnet100", 512)
    assert (cfg.head.loss, cfg.head.scale, cfg.head.margin) == ("arcface", 64.0, 0.5)
    assert cfg.train.batch_size * cfg.train.grad_accum == 512 and cfg.head.queue_size == 4 * 8192
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == ("sgd", 5e-3, 5e-4, 0.9)
    assert cfg.schedule.milestones == [50000, 70000] and cfg.schedule.gamma == 0.1 and cfg.train.steps == 80000


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = apply_overrides(Config(), ["optim.lr=0.05", "schedule.milestones=[10, 20]", "train.init=null",
                                     "head.compensate=false", "optim.weight_decay=5e-4",
                                     "model.kwargs={layers: [1,1,1,1]}", "optim.clip_grad=5"])
    assert cfg.optim.lr == 0.05 and cfg.schedule.milestones == [10, 20] and cfg.train.init is None
    assert cfg.head.compensate is False and cfg.model.kwargs == {"layers": [1, 1, 1, 1]}
    assert cfg.optim.weight_decay == 5e-4  # YAML 1.1 reads "5e-4" as a string; accepted for floats
    assert isinstance(cfg.optim.clip_grad, float)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("optimizer.lr=0.1", "unknown config key 'optimizer'"),
    ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
    ("train.steps=1.5", "train.steps: expected int, got float"),
    ("train.steps=true", "train.steps: expected int, got bool"),
    ("head.loss=sphereface", "head.loss: expected one of arcface, cosface, combined, softmax"),
    ("schedule.milestones=5", "schedule.milestones: expected a list"),
    ("optim.lr", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        apply_overrides(Config(), [override])
    assert override.split("=")[0] in str(err.value)


def test_bad_file_keys_name_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  mommentum: 0.9\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'optim.mommentum'"):
        load_config(path)
    path.write_text("train:\n  batch_size: big\n")
    with pytest.raises(ValueError, match=r"bad.yaml: train.batch_size: expected int, got str 'big'"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_config(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: invalid YAML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, field", [
    ("train.batch_size=0", "train.batch_size"), ("schedule.milestones=[20, 10]", "schedule.milestones"),
    ("optim.clip_grad=0", "optim.clip_grad"), ("head.queue_size=-1", "head.queue_size"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"), ("optim.betas=[0.9]", "optim.betas"),
])
def test_validate_names_the_field(override, field):
    with pytest.raises(ValueError, match=f"config {field}="):
        apply_overrides(Config(), [override]).validate()


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["optim.name=lars", "head.queue_size=128", "train.amp=bf16"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, world, device, field", [
    (["train.amp=fp16"], 1, "cpu", "train.amp"),
    (["optim.zero=true"], 1, "cpu", "optim.zero"),
    (["head.diagnostics=true"], None, None, "head.storage"),
    (["distill.cache=c.npy"], None, None, "distill.teacher"),
    (["distill.teacher=t.pt", "distill.unlabeled_root=u"], 2, "cpu", "distill.unlabeled_root"),
])
def test_validate_checks_the_run_it_is_for(overrides, world, device, field):
    cfg = apply_overrides(Config(), overrides)
    with pytest.raises(ValueError, match=f"config {field}="):
        cfg.validate(world, device)


def test_validate_accepts_what_the_run_supports():
    apply_overrides(Config(), ["train.amp=fp16", "optim.zero=true"]).validate(2, "cuda")
    apply_overrides(Config(), ["optim.zero=true"]).validate()  # world unknown (--print-config): not refused
    apply_overrides(Config(), ["head.diagnostics=true", "head.storage=full"]).validate(1, "cpu")
