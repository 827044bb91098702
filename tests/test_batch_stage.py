"""The batch stage: mixup and CutMix as timm defines them, drawn from (seed, epoch, sample)
whatever the batch size, process count or backend, with soft targets in the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastkd.config import config_from_dict, config_to_dict
from fastkd.data import build_loaders
from fastkd.errors import ConfigError
from fastkd.steps import ClassificationStep, cross_entropy
from pipelines.augment import epoch_order
from pipelines.base import Shard
from pipelines.batch_stage import Mixing, MixSpec, _mix_view, cut_boxes, mix_draws
from tests.conftest import CPU, batch_of, data_config, require_backend, tiny_config_dict

MIXUP = MixSpec(mixup_alpha=0.8)
CUTMIX = MixSpec(cutmix_alpha=1.0)
BOTH = {"mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5}}


def mixed(spec: MixSpec, images, labels, indices, *, epoch=0, teacher=None):
    mixing = Mixing(spec, seed=0, num_items=100)
    mixing.set_epoch(epoch)
    return mixing, mixing(batch_of(images, labels, indices, teacher_images=teacher))


def test_mixup_blends_each_pair_with_one_weight_and_targets_both_labels():
    images = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    labels, indices = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([10, 11, 12, 13, 14, 15])
    _, out = mixed(MIXUP, images, labels, indices)
    lam = mix_draws(MIXUP, seed=0, epoch=0, num_items=100).lam[[10, 10, 12, 12, 14, 14]]  # the pair's first sample
    assert not np.allclose(lam, 1) and not np.allclose(lam, lam[0])
    partner = images[[1, 0, 3, 2, 5, 4]]
    expected = torch.from_numpy(lam).float().view(6, 1, 1, 1) * images + (1 - torch.from_numpy(lam).float().view(
        6, 1, 1, 1)) * partner
    torch.testing.assert_close(out.images, expected)
    assert out.images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.mix.weight, torch.from_numpy(lam).float())
    assert out.mix.partner_labels.tolist() == [1, 0, 3, 2, 5, 4]
    assert torch.equal(out.labels, labels) and torch.equal(out.indices, indices)


def test_elem_mode_draws_each_sample_apart():
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    _, out = mixed(MixSpec(mixup_alpha=0.8, mode="elem"), images, labels, torch.tensor([3, 7, 9, 20]))
    lam = torch.from_numpy(mix_draws(MIXUP, seed=0, epoch=0, num_items=100).lam[[3, 7, 9, 20]]).float()
    torch.testing.assert_close(out.mix.weight, lam)
    expected = lam.view(4, 1, 1, 1) * images + (1 - lam.view(4, 1, 1, 1)) * images[[1, 0, 3, 2]]
    torch.testing.assert_close(out.images, expected)


def test_with_both_each_pair_is_mixed_up_or_cut():
    """Switch probability 0.5: some pairs blended (every pixel moves), others cut (pixels either
    the image's own or the partner's), each as its draw says; elem mode gives each sample a box."""
    spec = MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
    n = 32
    images = torch.randn(n, 3, 16, 16)
    indices = torch.arange(n)
    _, out = mixed(spec, images, torch.arange(n), indices)
    draws = mix_draws(spec, seed=0, epoch=0, num_items=100)
    partner = images[torch.arange(n) ^ 1]
    assert 0 < draws.cut[:n].sum() < n
    for k in range(n):
        own, other = (out.images[k] == images[k]), (out.images[k] == partner[k])
        if draws.cut[k]:
            assert (own | other).all() and other.any()
            box = cut_boxes(draws.lam[[k]], draws.centre[[k]], 16, 16)[0]
            assert other[:, box[0]:box[1], box[2]:box[3]].all()
        else:
            assert not own.any()


def test_cutmix_pastes_the_partners_box_and_weights_the_target_by_its_area():
    images = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).view(2, 3, 20, 20)
    teacher = torch.randn(2, 3, 40, 40)
    _, out = mixed(CUTMIX, images, torch.tensor([4, 7]), torch.tensor([5, 6]), epoch=3, teacher=teacher)
    draws = mix_draws(CUTMIX, seed=0, epoch=3, num_items=100)
    lam, centre = draws.lam[[5, 5]], draws.centre[[5, 5]]
    for view, original, side in ((out.images, images, 20), (out.teacher_images, teacher, 40)):
        top, bottom, left, right = cut_boxes(lam, centre, side, side)[0]
        assert bottom > top and right > left  # the draw (seed 0, epoch 3) cuts a box
        inside = torch.zeros(side, side, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(view[0][:, inside], original[1][:, inside])  # the partner's pixels, in the same box
        assert torch.equal(view[0][:, ~inside], original[0][:, ~inside])
        assert torch.equal(view[1][:, inside], original[0][:, inside])
    top, bottom, left, right = cut_boxes(lam, centre, 20, 20)[0]
    area = (bottom - top) * (right - left) / 400
    torch.testing.assert_close(out.mix.weight, torch.full((2,), 1 - area, dtype=torch.float32))


def test_unmixed_pairs_keep_their_images_and_labels():
    images = torch.randn(4, 3, 8, 8)
    _, out = mixed(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0), images, torch.arange(4), torch.arange(4))
    assert torch.equal(out.images, images) and torch.equal(out.mix.weight, torch.ones(4))


BOTH_SPEC = MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0)


@pytest.mark.parametrize("spec, student, flags", [
    (MIXUP, 12, (True, False, False)),
    (CUTMIX, 12, (False, True, True)),
    (CUTMIX, 3, (False, False, True)),  # at 3 px every box is empty; the teacher's 24-px boxes are not
    (BOTH_SPEC, 12, (True, True, True)),
    (MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0), 12, (False, False, False)),
], ids=["mixup", "cutmix", "cutmix-3px", "both", "unmixed"])
def test_a_blend_or_paste_the_host_table_rules_out_is_skipped_and_changes_nothing(spec, student, flags,
                                                                                  monkeypatch):
    """The stage skips the blend when every pixel weight is 1 and a view's paste when none of its
    boxes is cut (known from its host table, per view): its output equals the full blend-then-paste."""
    import pipelines.batch_stage as stage

    calls = []

    def recording(*args, blend, paste):
        calls.append((blend, paste))
        return _mix_view(*args, blend=blend, paste=paste)

    monkeypatch.setattr(stage, "_mix_view", recording)
    images = torch.randn(8, 3, student, student).contiguous(memory_format=torch.channels_last)
    teacher = torch.randn(8, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    indices = torch.arange(20, 28)
    mixing, out = mixed(spec, images, torch.arange(8), indices, teacher=teacher)
    (blend, student_paste), (teacher_blend, teacher_paste) = calls
    assert (blend, student_paste, teacher_paste) == flags and teacher_blend == blend
    table = torch.from_numpy(mixing.table(indices.numpy(), [(student, student), (24, 24)]))
    swap = torch.arange(8) ^ 1
    for k, (view, original) in enumerate(((out.images, images), (out.teacher_images, teacher))):
        full = _mix_view(original, swap, table[:, 0], table[:, 2 + 4 * k:6 + 4 * k], blend=True, paste=True)
        assert torch.equal(view, full)
        assert view.is_contiguous(memory_format=torch.channels_last)


def test_the_draws_follow_timms_distributions():
    draws = mix_draws(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5), seed=1, epoch=0,
                      num_items=20000)
    assert abs(draws.cut.mean() - 0.5) < 0.02  # switch probability
    assert abs(draws.lam[draws.cut].mean() - 0.5) < 0.02 and abs(draws.lam[~draws.cut].mean() - 0.5) < 0.02
    assert abs(draws.lam[draws.cut].var() - 1 / 12) < 0.01  # Beta(1, 1) is uniform
    assert abs(draws.lam[~draws.cut].var() - 0.8**2 / (1.6**2 * 2.6)) < 0.01  # Beta(0.8, 0.8)
    half = mix_draws(MixSpec(mixup_alpha=0.8, prob=0.5), seed=1, epoch=0, num_items=20000)
    assert abs((half.lam == 1).mean() - 0.5) < 0.02
    again = mix_draws(MixSpec(mixup_alpha=0.8), seed=1, epoch=1, num_items=20000)
    assert not np.array_equal(again.lam, mix_draws(MixSpec(mixup_alpha=0.8), seed=1, epoch=0, num_items=20000).lam)


def test_soft_target_cross_entropy_is_timms_mixup_target_and_soft_cross_entropy():
    logits, labels, partner = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 0, 3, 2, 0, 4])
    weight, smoothing = torch.rand(6), 0.1
    from pipelines.base import Mix

    loss = cross_entropy(logits, labels, Mix(weight=weight, partner_labels=partner), smoothing)
    off, on = smoothing / 5, 1 - smoothing + smoothing / 5
    one_hot = lambda y: torch.full((6, 5), off).scatter_(1, y.view(-1, 1), on)  # noqa: E731 (timm's one_hot)
    target = one_hot(labels) * weight.view(-1, 1) + one_hot(partner) * (1 - weight.view(-1, 1))
    torch.testing.assert_close(loss, (-target * F.log_softmax(logits, dim=1)).sum(dim=1).mean())
    assert torch.equal(cross_entropy(logits, labels, None, smoothing),
                       F.cross_entropy(logits, labels, label_smoothing=smoothing))


def test_a_mixed_batch_trains_against_both_labels():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    step = ClassificationStep(model, autocast=lambda: torch.autocast("cpu", enabled=False))
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, batch = mixed(MIXUP, images, labels, torch.arange(4))
    out = step(batch)
    expected = cross_entropy(model(batch.images), labels, batch.mix, 0.0)
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(out.loss, F.cross_entropy(model(batch.images), labels))


def mixed_by_sample(root, backend, *, batch_size, rank=0, world_size=1, **data) -> dict[int, tuple]:
    """Epoch 1's mixed training images, target weights and partner labels, by sample index."""
    cfg = data_config(root, backend, batch_size=batch_size, **BOTH, **data, trivialaugment={})
    loader = build_loaders(cfg, spec=CPU, seed=0, shard=Shard(rank=rank, world_size=world_size)).train
    loader.set_epoch(1)
    out = {}
    for batch in loader:
        for k, index in enumerate(batch.indices.tolist()):
            out[index] = (batch.images[k], float(batch.mix.weight[k]), int(batch.mix.partner_labels[k]))
    return out


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_every_sample_is_mixed_alike_whatever_the_batch_size_or_process_count(tiny_imagefolder, backend):
    """TrivialAugment then mixup / CutMix: each sample's image, weight and partner are the same;
    with data.drop_last the samples of the full batches are mixed as without it."""
    require_backend(backend)
    one = mixed_by_sample(tiny_imagefolder, backend, batch_size=8, drop_last=False)
    assert len(one) == 40 and any(weight < 1 for _, weight, _ in one.values())
    by_batch = mixed_by_sample(tiny_imagefolder, backend, batch_size=6, drop_last=False)
    ranks = {}
    for rank in (0, 1, 2):  # 40 samples on 3 ranks: the order is padded to 42, 2 samples twice
        for index, seen in mixed_by_sample(tiny_imagefolder, backend, batch_size=4, rank=rank, world_size=3,
                                           drop_last=False).items():
            again = ranks.setdefault(index, seen)  # a padded copy is mixed as the sample itself
            assert torch.equal(again[0], seen[0]) and again[1:] == seen[1:]
    for other in (by_batch, ranks):
        assert sorted(other) == sorted(one)
        for index, (image, weight, partner) in one.items():
            assert torch.equal(other[index][0], image) and other[index][1:] == (weight, partner)
    dropped = mixed_by_sample(tiny_imagefolder, backend, batch_size=6)  # 6 full batches: 36 of the 40
    assert len(dropped) == 36
    for index, (image, weight, partner) in dropped.items():
        assert torch.equal(one[index][0], image) and one[index][1:] == (weight, partner)


@pytest.mark.parametrize("num_items", [40, 41, 7])
def test_pairs_are_dealt_to_ranks_whole(num_items):
    """Every copy of a sample (padding repeats some) sits in the same pair on every rank: an odd
    count's last sample is paired with itself."""
    whole = epoch_order(num_items, seed=0, epoch=1, shuffle=True, deal=2)
    pairs = {tuple(whole[i:i + 2]) for i in range(0, len(whole), 2)}
    assert sorted(set(whole)) == list(range(num_items)) and len(whole) == num_items + num_items % 2
    partner = {}
    for a, b in pairs:
        assert partner.setdefault(a, b) == b and partner.setdefault(b, a) == a  # one partner each
    for world_size in (2, 3, 4):
        for rank in range(world_size):
            mine = epoch_order(num_items, seed=0, epoch=1, shuffle=True, rank=rank, world_size=world_size, deal=2)
            assert len(mine) % 2 == 0
            assert all(tuple(mine[i:i + 2]) in pairs for i in range(0, len(mine), 2))
    assert epoch_order(num_items, seed=0, epoch=1, shuffle=True)[:num_items] == whole[:num_items]  # the same order


def test_a_sample_paired_with_itself_is_left_as_it_is():
    images = torch.randn(2, 3, 8, 8)
    images[1] = images[0]
    _, out = mixed(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0), images, torch.tensor([3, 3]), torch.tensor([5, 5]))
    assert torch.equal(out.images, images) and out.mix.partner_labels.tolist() == [3, 3]


@pytest.mark.parametrize("data, message", [
    ({"mix": {"mixup_alpha": 0.2}, "batch_size": 7}, "data.batch_size: must be even with data.mix"),
    ({"mix": {"mixup_alpha": 0.2, "mode": "batch"}}, "data.mix.mode: batch (one draw per batch) would make the mixed "
                                                      "images depend on the batch size"),
    ({"mix": {"cutmix_alpha": -1}}, "data.mix.cutmix_alpha: must be >= 0"),
    ({"mix": {"mixup_alpha": 0.2, "prob": 1.5}}, "data.mix.prob: must be within [0, 1]"),
    ({"mix": {"prob": 0.5}}, "data.mix.mixup_alpha: must be > 0 where data.mix.cutmix_alpha is 0: the section would "
                             "mix nothing"),
    ({"mix": {"cutmix_alpha": 1.0, "switch_prob": 0.3}}, "data.mix.switch_prob: 0.3 has no effect: it chooses between "
                                                          "mixup and CutMix"),
    ({"randaugment": {"magnitude": 31}}, "data.randaugment.magnitude: must be within [0, magnitude_bins) = [0, 31)"),
    ({"randaugment": {}, "trivialaugment": {}}, "data.trivialaugment: cannot be set with data.randaugment"),
    ({"trivialaugment": {"num_ops": 2}}, "data.trivialaugment.num_ops: unknown key"),
    ({"dali": {"device": "cpu"}}, "data.dali: has no effect: data.backend is torchvision, not dali"),
    ({"synthetic": {"num_classes": 5}}, "data.synthetic: has no effect: data.backend is torchvision, not synthetic"),
    ({"mix_prob": 0.5}, "data.mix_prob: moved to data.mix.prob"),
    ({"auto_augment": "trivialaugment"}, "data.auto_augment: moved to a section of its own: data.randaugment or "
                                         "data.trivialaugment"),
    ({"dali_device": "cpu"}, "data.dali_device: moved to data.dali.device"),
    ({"start_image_size": 16}, "data.start_image_size: moved to data.size_schedule.start_image_size"),
])
def test_batch_stage_settings_that_cannot_work_are_refused(tmp_path, data, message):
    """A setting without effect cannot be written (its section is the feature); a key of an earlier
    fastkd names its new place."""
    raw = tiny_config_dict(tmp_path, tmp_path / "runs", data=data)
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("data", [
    {"mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.5, "switch_prob": 0.3, "mode": "elem"}},
    {"mix": {"cutmix_alpha": 1.0, "prob": 0.5, "mode": "elem"}},
    {"randaugment": {"num_ops": 3, "magnitude": 5, "magnitude_bins": 11}},
    {"trivialaugment": {"magnitude_bins": 11}},
    {"mix": {"mixup_alpha": 0.2, "prob": 1.0, "switch_prob": 0.5, "mode": "pair"}, "randaugment": {"num_ops": 2}},
])
def test_batch_stage_settings_are_taken_where_they_have_an_effect(tmp_path, data):
    saved = config_to_dict(config_from_dict(tiny_config_dict(tmp_path, tmp_path / "runs", data=data)))["data"]
    assert all(saved[section][key] == value for section, values in data.items() for key, value in values.items())


def test_dkd_with_mixed_labels_is_refused(tmp_path):
    raw = tiny_config_dict(tmp_path, tmp_path / "runs", data={"mix": {"mixup_alpha": 0.2}})
    raw["distill"] = {"teacher": {"arch": "resnet18", "checkpoint": str(tmp_path / "t.pt")}, "loss": "dkd"}
    with pytest.raises(ConfigError, match="^distill.loss: dkd splits .* at each sample's one label"):
        config_from_dict(raw)
    del raw["data"]["mix"]
    config_from_dict(raw)  # without mixing, dkd is fine


@pytest.mark.gpu
def test_the_batch_stage_queues_its_work_without_a_host_sync_on_a_gpu():
    """fp16 channels-last GPU batches, and a teacher view, through RandAugment and mixup/CutMix:
    any synchronizing call raises in "error" sync-debug mode, from the very first batch (no warm-up
    outside the check: its per-size constants are made inside it)."""
    from pipelines.auto_augment import AutoAugment
    from pipelines.base import run_stages

    stages = [AutoAugment("randaugment", seed=0, num_items=64),
              Mixing(MixSpec(mixup_alpha=0.8, cutmix_alpha=1.0), seed=0, num_items=64)]
    for stage in stages:
        stage.set_epoch(0)
    images = torch.randn(16, 3, 32, 32, device="cuda").clamp(-2, 2).half()
    batch = batch_of(images.contiguous(memory_format=torch.channels_last), torch.randint(10, (16,), device="cuda"),
                     torch.arange(16), teacher_images=torch.randn(16, 3, 64, 64, device="cuda").clamp(-2, 2).half())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the first call makes the per-size constants on the device, the second reuses them
            out = run_stages(batch, stages)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.images.dtype == torch.float16 and out.images.is_contiguous(memory_format=torch.channels_last)
    assert out.teacher_images.shape[-1] == 64 and out.mix is not None
