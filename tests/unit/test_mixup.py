"""ffdist.mixup against timm's Mixup (same draws in, same images and targets out), the
draws' statistics, and the same mixed global batch for any world size and after resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffdist import mixup, recipe_load
from ffdist.data.mapstyle import TrainSampler
from ffdist.resolved import plan_batches

timm_mixup = pytest.importorskip("timm.data.mixup", reason="timm is the reference here")


def _cfg(*overrides: str):
    return recipe_load.load(None, ["data.batch_size=16", *overrides]).data


def _mixer(cfg, world: int = 1, rank: int = 0, micro: int | None = None, seed: int = 0,
           classes: int = 5, smoothing: float = 0.1) -> mixup.Mixer:
    per_rank = cfg.batch_size // world
    return mixup.Mixer(cfg, classes, smoothing, cfg.batch_size, world, rank, micro or per_rank,
                       seed)


def _timm_order(n: int) -> torch.Tensor:
    """Our pairs are neighbours (2j, 2j+1), timm's mirror images (j, n-1-j): position of
    each of our images in a batch that timm pairs the same way."""
    where = torch.empty(n, dtype=torch.long)
    where[0::2] = torch.arange(n // 2)
    where[1::2] = n - 1 - torch.arange(n // 2)
    return where


def _timm_mix(monkeypatch, mode: str, x: torch.Tensor, y: torch.Tensor, rows: np.ndarray,
              cfg, classes: int, smoothing: float):
    """timm's Mixup on the same images, pairs and draws (its RNG replaced by ours)."""
    n = len(x)
    where = _timm_order(n)
    xt, yt = torch.empty_like(x), torch.empty_like(y)
    xt[where], yt[where] = x, y
    lam, cut, box = rows[:, 0], rows[:, 1] > 0, rows[:, 2:].astype(int)
    m = timm_mixup.Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                         prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob, mode=mode,
                         label_smoothing=smoothing, num_classes=classes)
    if mode == "batch":
        monkeypatch.setattr(m, "_params_per_batch", lambda: (float(lam[0]), bool(cut[0])))
        boxes = iter([(tuple(box[0]), float(lam[0]))])
    else:
        # timm draws for its positions t < n (elem) or t < n/2 (pair, shared with n-1-t)
        firsts = np.argsort(where.numpy())  # timm position -> our index
        k = n if mode == "elem" else n // 2
        ours = firsts[:k]
        monkeypatch.setattr(m, "_params_per_elem", lambda _: (
            lam[ours].astype(np.float32), cut[ours]))
        boxes = iter([(tuple(box[i]), float(lam[i])) for i in ours if cut[i] and lam[i] != 1])
    monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", lambda *a, **k: next(boxes))
    xm, target = m(xt.clone(), yt)
    return xm[where], target[where]


@pytest.mark.parametrize("mode,alphas", [
    ("batch", ("data.mixup_alpha=0.8", "data.cutmix_alpha=1.0")),
    ("batch", ("data.mixup_alpha=0.2",)), ("batch", ("data.cutmix_alpha=1.0",)),
    ("pair", ("data.mixup_alpha=0.8", "data.cutmix_alpha=1.0")),
    ("elem", ("data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.mix_prob=0.7")),
])
def test_same_images_and_targets_as_timm_for_the_same_draws(monkeypatch, mode, alphas):
    cfg = _cfg(*alphas, f"data.mix_mode={mode}")
    classes, smoothing = 5, 0.1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 12, 10, generator=g)
    y = torch.randint(0, classes, (16,), generator=g)
    mixer = _mixer(cfg, classes=classes, smoothing=smoothing)
    checked = 0
    for step in range(12):  # enough steps to see mixup, cutmix and (elem) unmixed images
        rows = mixer.params(step, 0, 16, 12, 10)
        ours, target = mixer(x, y, step)
        ref, ref_target = _timm_mix(monkeypatch, mode, x, y, rows, cfg, classes, smoothing)
        # batch: bit for bit; pair/elem: timm computes 1 - lam in float32 (ours: float64)
        tol = {} if mode == "batch" else {"atol": 1e-6, "rtol": 0}
        torch.testing.assert_close(ours, ref, **(tol or {"atol": 0, "rtol": 0}))
        torch.testing.assert_close(target, ref_target, **(tol or {"atol": 0, "rtol": 0}))
        checked += int((rows[:, 0] < 1).any())
    assert checked >= 8  # most steps mixed something (mix_prob >= 0.7)


def test_box_is_timms_rand_bbox(monkeypatch):
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(4, 40)), int(rng.integers(4, 40))
        lam = float(rng.random())
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        centres = iter([cy, cx])
        monkeypatch.setattr(timm_mixup.np.random, "randint", lambda *a, _c=centres, **k: next(_c))
        assert tuple(timm_mixup.rand_bbox((3, h, w), lam)) == tuple(
            mixup.centred_box(np.array([lam]), np.array([cy]), np.array([cx]), h, w)[0])


def test_minmax_boxes_follow_timm_ranges():
    cfg = _cfg("data.cutmix_minmax=[0.2,0.6]")
    d = _mixer(cfg).draws(3, 50, 40)
    sides_h, sides_w = d.box[:, 1] - d.box[:, 0], d.box[:, 3] - d.box[:, 2]
    assert d.cut.all()  # minmax switches cutmix on (timm forces cutmix_alpha=1)
    assert ((sides_h >= 10) & (sides_h < 30)).all() and ((sides_w >= 8) & (sides_w < 24)).all()
    assert (d.box[:, 1] <= 50).all() and (d.box[:, 3] <= 40).all()
    np.testing.assert_allclose(d.lam, 1 - sides_h * sides_w / 2000)


def test_targets_are_timms_mixup_target_and_the_loss_is_soft_cross_entropy():
    y = torch.tensor([0, 3, 1, 1, 4, 2])
    lam = np.array([0.3, 0.3, 1.0, 1.0, 0.75, 0.75])
    rows = np.stack([lam, np.zeros(6), *np.zeros((4, 6))], axis=1)
    _, target = mixup.mix(torch.zeros(6, 1, 2, 2), y, rows, 5, 0.1)
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    # timm's mixup_target with our partner order (it pairs by flip(0)): on 1-s+s/C, off s/C
    y1 = timm_mixup.one_hot(y, 5, on_value=0.9 + 0.02, off_value=0.02)
    want = y1 * torch.tensor(lam, dtype=torch.float32)[:, None] + y1[partner] * torch.tensor(
        1 - lam, dtype=torch.float32)[:, None]
    torch.testing.assert_close(target, want)
    assert torch.allclose(target.sum(1), torch.ones(6))
    logits = torch.randn(6, 5)
    from timm.loss import SoftTargetCrossEntropy

    torch.testing.assert_close(mixup.soft_target_cross_entropy(logits, target),
                               SoftTargetCrossEntropy()(logits, target))
    # unmixed: the soft target IS label smoothing, so the loss is torch's smoothed CE
    plain = mixup.smooth_one_hot(y, 5, 0.1)
    torch.testing.assert_close(mixup.soft_target_cross_entropy(logits, plain),
                               F.cross_entropy(logits, y, label_smoothing=0.1))


def test_draw_statistics_follow_prob_switch_beta_and_timms_boxes():
    from scipy import stats

    cfg = _cfg("data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "data.mix_mode=elem",
               "data.mix_prob=0.6", "data.mix_switch_prob=0.3", "data.batch_size=512")
    m = _mixer(cfg)
    lam, cut = [], []
    for step in range(40):
        d = m.draws(step, 64, 64)
        lam.append(d.lam)
        cut.append(d.cut)
    lam, cut = np.concatenate(lam), np.concatenate(cut)
    applied = lam < 1
    assert abs(applied.mean() - 0.6) < 0.02  # n = 20480: 4 sigma is 0.014
    assert abs(cut.sum() / applied.sum() - 0.3) < 0.02
    blended = lam[applied & ~cut]
    assert stats.kstest(blended, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    # cutmix lam is the area left after clipping the box to the image: the same
    # distribution as timm's own cutmix_bbox_and_lam draws (two-sample KS test)
    np.random.seed(0)
    theirs = [timm_mixup.cutmix_bbox_and_lam((64, 64), np.random.beta(1.0, 1.0))[1]
              for _ in range(4000)]
    assert stats.ks_2samp(lam[cut], theirs).pvalue > 1e-3


def test_global_step_draws_are_shared_by_ranks_and_resumes():
    cfg = _cfg("data.mixup_alpha=0.2", "data.cutmix_alpha=1.0")
    a, b = _mixer(cfg, world=2, rank=0), _mixer(cfg, world=2, rank=1, seed=0)
    for step in (0, 5, 1000):
        da, db, fresh = a.draws(step, 8, 8), b.draws(step, 8, 8), _mixer(cfg).draws(step, 8, 8)
        assert np.array_equal(da.lam, db.lam) and np.array_equal(da.lam, fresh.lam)
    assert not np.array_equal(a.draws(1, 8, 8).lam, a.draws(2, 8, 8).lam)
    assert not np.array_equal(_mixer(cfg, seed=1).draws(1, 8, 8).lam, a.draws(1, 8, 8).lam)


def _mixed_global_batch(cfg, images: torch.Tensor, world: int, micro: int, step: int,
                        epoch: int = 0) -> dict:
    """index -> (mixed image, target) over all ranks and micro-batches of one step."""
    plan = plan_batches(cfg.batch_size, micro, world)
    out = {}
    for rank in range(world):
        s = TrainSampler(len(images), plan, rank, seed=0, pairs=True)
        s.set_epoch(epoch, skip_steps=step)
        keys = list(s)[: plan.per_rank]
        mixer = _mixer(cfg, world, rank, plan.micro, classes=7)
        for m in range(plan.accum):
            part = keys[m * plan.micro:(m + 1) * plan.micro]
            idx = torch.tensor([k[1] for k in part])
            x, t = mixer(images[idx], idx % 7, step, micro=m)
            out.update({int(i): (xi, ti) for i, xi, ti in zip(idx, x, t)})
    return out


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_the_mixed_global_batch_is_the_same_for_any_world_size(mode):
    cfg = _cfg("data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", f"data.mix_mode={mode}",
               "data.batch_size=32", *(["data.mix_group=8"] if mode == "batch" else []))
    images = torch.randn(100, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    for step in (0, 1, 2):
        ref = _mixed_global_batch(cfg, images, world=1, micro=32, step=step)
        assert len(ref) == 32
        changed = sum(not torch.equal(v[0], images[k]) for k, v in ref.items())
        assert changed >= 8, "the reference mixed hardly anything"
        for world, micro in ((2, 16), (4, 8), (2, 4), (8, 2)):
            got = _mixed_global_batch(cfg, images, world, micro, step)
            assert got.keys() == ref.keys()
            for k in ref:
                assert torch.equal(got[k][0], ref[k][0]) and torch.equal(got[k][1], ref[k][1]), \
                    f"world {world} micro {micro}: image {k} of step {step} differs"


def test_batch_mode_groups_share_one_draw():
    cfg = _cfg("data.mixup_alpha=1.0", "data.batch_size=32", "data.mix_group=8")
    m = _mixer(cfg)
    rows = m.params(4, 0, 32, 8, 8)
    positions = m.positions(0, 32)
    for g in range(4):
        assert len(set(rows[positions // 8 == g, 0])) == 1
    assert len(set(rows[:, 0])) > 1
    whole = _mixer(_cfg("data.mixup_alpha=1.0", "data.batch_size=32")).params(4, 0, 32, 8, 8)
    assert len(set(whole[:, 0])) == 1  # default group: the whole global batch


def test_pairs_need_even_micro_batches_and_soft_target_flag():
    cfg = _cfg("data.mixup_alpha=0.2")
    assert mixup.enabled(cfg) and mixup.soft_targets(cfg)
    assert not mixup.soft_targets(_cfg()) and not mixup.enabled(_cfg("data.mix_prob=0"))
    from ffdist.errors import RecipeError

    with pytest.raises(RecipeError, match="even data.micro_batch_size"):
        TrainSampler(100, plan_batches(18, 3, 2), 0, 0, pairs=True)


def test_the_run_mixes_with_the_soft_loss_and_smooths_labels_once():
    """mixup.for_run/criterion, what the Trainer uses: with mixing, the loss is the soft
    cross-entropy and the smoothing is in the targets only (torch's smoothed CE on top would
    smooth twice); without, plain cross-entropy with label smoothing on class indices."""
    mixing = recipe_load.load(None, ["data.batch_size=16", "data.mixup_alpha=0.2",
                                "optim.label_smoothing=0.1", "model.num_classes=5"])
    plan = plan_batches(16, 4, 2)
    mixer = mixup.for_run(mixing, plan, rank=1)
    assert (mixer.world, mixer.rank, mixer.micro, mixer.smoothing) == (2, 1, 4, 0.1)
    loss = mixup.criterion(mixing)
    assert loss is mixup.soft_target_cross_entropy
    logits, y = torch.randn(6, 5), torch.tensor([0, 3, 1, 1, 4, 2])
    unmixed = np.stack([np.ones(6), *np.zeros((5, 6))], axis=1)
    _, target = mixup.mix(torch.zeros(6, 1, 2, 2), y, unmixed, 5, 0.1)
    torch.testing.assert_close(loss(logits, target),
                               F.cross_entropy(logits, y, label_smoothing=0.1))
    plain = recipe_load.load(None, ["optim.label_smoothing=0.1"])
    assert mixup.for_run(plain, plan, 0) is None
    ce = mixup.criterion(plain)
    assert isinstance(ce, torch.nn.CrossEntropyLoss) and ce.label_smoothing == 0.1


def test_an_odd_batch_leaves_its_last_image_unmixed():
    cfg = _cfg("data.mixup_alpha=1.0", "data.mix_mode=elem")
    x, y = torch.randn(7, 1, 4, 4), torch.arange(7) % 5
    out, target = _mixer(cfg)(x, y, step=0)
    assert torch.equal(out[-1], x[-1])
    assert torch.equal(target[-1], mixup.smooth_one_hot(y[-1:], 5, 0.1)[0])


def test_channels_last_stays_channels_last():
    cfg = _cfg("data.mixup_alpha=1.0", "data.cutmix_alpha=1.0", "data.mix_mode=elem")
    x = torch.randn(16, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out, _ = _mixer(cfg)(x, torch.zeros(16, dtype=torch.long), step=3)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_mixing_on_cuda_never_waits_for_the_device():
    cfg = _cfg("data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.mix_mode=elem")
    m = _mixer(cfg)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 5, (16,), device="cuda")
    m(x, y, step=0)  # warm-up: pinned-memory pool, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 6):
            out, target = m(x, y, step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu, cpu_t = m(x.cpu(), y.cpu(), 5)
    torch.testing.assert_close(out.cpu(), cpu)
    torch.testing.assert_close(target.cpu(), cpu_t)
