"""head.* config keys build the heads they name, with the papers' defaults, and bad values are clear errors."""
import pytest
import torch

from broadface.heads import AdaFace, ArcFace, CurricularFace, MagFace, SubCenterArcFace
from broadface.train.build import build_head
from broadface.train.config import Config, apply_overrides


def head_of(*overrides, world=1):
    cfg = apply_overrides(Config(), list(overrides)).validate(world_size=world)
    return build_head(cfg.head, 50, 8, world)


def test_every_family_loss_builds_with_paper_defaults():
    ada = head_of("head.loss=adaface").margin
    assert type(ada) is AdaFace and (ada.m, ada.h, ada.t_alpha, ada.scale) == (0.4, 0.333, 0.01, 64.0)
    mag = head_of("head.loss=magface").margin
    assert type(mag) is MagFace
    assert (mag.l_a, mag.u_a, mag.l_margin, mag.u_margin, mag.lambda_g) == (10.0, 110.0, 0.45, 0.8, 35.0)
    cur = head_of("head.loss=curricularface").margin
    assert type(cur) is CurricularFace and (cur.m2, cur.alpha) == (0.5, 0.01)
    sub = head_of("head.loss=subcenter").margin
    assert type(sub) is SubCenterArcFace and tuple(sub.weight.shape) == (50, 3, 8) and sub.m2 == 0.5


def test_family_keys_reach_the_margins_and_the_queue():
    head = head_of("head.loss=adaface", "head.adaface.m=0.3", "head.adaface.h=0.5", "head.queue_size=16")
    assert (head.margin.m, head.margin.h) == (0.3, 0.5) and head.queue.keep_norms
    head = head_of("head.loss=magface", "head.magface.u_a=80", "head.magface.lambda_g=20")
    assert (head.margin.u_a, head.margin.lambda_g) == (80.0, 20.0)
    head = head_of("head.loss=subcenter", "head.subcenters=2", "head.margin=0.4", "head.queue_size=16")
    assert tuple(head.weight.shape) == (50, 2, 8) and head.margin.m2 == 0.4 and head.queue.keep_subcenters
    head = head_of("head.loss=curricularface", "head.curricular_alpha=0.1")
    assert head.margin.alpha == 0.1


def test_union_dtype_key():
    assert head_of().union_dtype == torch.float32
    assert head_of("head.union_dtype=bfloat16").union_dtype == torch.bfloat16
    assert head_of("head.union_dtype=float16").union_dtype == torch.float16
    assert type(head_of().margin) is ArcFace


@pytest.mark.parametrize("override,match", [
    ("head.subcenters=0", "head.subcenters"), ("head.curricular_alpha=0", "head.curricular_alpha"),
    ("head.adaface.t_alpha=1.5", "head.adaface.t_alpha"), ("head.magface.l_a=200", "head.magface.l_a"),
    ("head.magface.u_margin=2.0", "head.magface.l_margin"),
])
def test_bad_family_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(Config(), [override]).validate()


def test_unknown_loss_and_dtype_are_refused():
    with pytest.raises(ValueError, match="head.loss"):
        apply_overrides(Config(), ["head.loss=sphereface"])
    with pytest.raises(ValueError, match="head.union_dtype"):
        apply_overrides(Config(), ["head.union_dtype=int8"])


def test_one_process_sampled_head_starts_from_the_plain_heads_classifier():
    """Sampling changes which classes a step uses, not the initial W: the arms of a paired comparison agree."""
    for loss in ("arcface", "subcenter"):
        heads = []
        for rate in ("1.0", "0.3"):
            torch.manual_seed(0)
            heads.append(head_of(f"head.loss={loss}", f"head.sample_rate={rate}", "head.queue_size=8"))
        assert heads[1].partition.sampled and torch.equal(heads[0].weight, heads[1].weight)


@pytest.mark.parametrize("loss", ["adaface", "magface", "curricularface", "subcenter"])
def test_family_training_resumes_bit_identically(tmp_path, faces, make_config, loss):
    """6 steps straight == 4 steps, resume, 2 steps: W, the queue (‖e⁻‖ / sub-centres) and the batch statistics."""
    from broadface.train.checkpoint import load_checkpoint
    from broadface.train.trainer import Trainer

    opts = [f"head.loss={loss}", "head.queue_size=20", "train.steps=6", "head.magface.l_a=1", "head.magface.u_a=20"]
    straight = Trainer(make_config(tmp_path / "a", *opts), train_set=faces, progress=False).fit()
    resumed = Trainer(make_config(tmp_path / "b", *opts, f"train.resume={tmp_path / 'a/checkpoints/step_0000004.pt'}"),
                      train_set=faces, progress=False).fit()
    a, b = load_checkpoint(straight.checkpoint)["head"], load_checkpoint(resumed.checkpoint)["head"]
    assert a.keys() == b.keys() and a["queue._extra_state"]["fill"] == 20
    extra = {"adaface": ["margin.batch_mean", "queue.norms"], "magface": ["queue.norms"],
             "curricularface": ["margin.t"], "subcenter": ["queue.subcenters"]}[loss]
    assert set(extra) <= set(a)
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
    fresh = Trainer(make_config(None, *opts, "train.steps=1"), train_set=faces, progress=False)
    for k in extra:  # the comparison above could fail: training moved these
        assert not torch.equal(a[k], fresh.head.checkpoint_state()[k]), k
