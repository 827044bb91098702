"""Each loss against a reference written from its paper's formula (float64, explicit sums)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastkd.config import DistillConfig, TeacherConfig
from fastkd.losses import dist_loss, distillation_term, dkd_loss, kd_loss

rng = np.random.default_rng(0)
B, C = 6, 7
S = rng.normal(0, 3, size=(B, C))
T_ = rng.normal(0, 3, size=(B, C))
Y = rng.integers(0, C, size=B)


def softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def reference_kd(temperature: float) -> float:
    return temperature**2 * sum(kl(softmax(T_[i], temperature), softmax(S[i], temperature)) for i in range(B)) / B


def reference_dkd(temperature: float, alpha: float, beta: float) -> float:
    total = 0.0
    for i in range(B):
        p_t, p_s = softmax(T_[i], temperature), softmax(S[i], temperature)
        y = Y[i]
        tckd = kl(np.array([p_t[y], 1 - p_t[y]]), np.array([p_s[y], 1 - p_s[y]]))
        others = [c for c in range(C) if c != y]
        nt_t = p_t[others] / p_t[others].sum()
        nt_s = p_s[others] / p_s[others].sum()
        total += alpha * tckd + beta * kl(nt_t, nt_s)
    return temperature**2 * total / B


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def reference_dist(temperature: float, beta: float, gamma: float) -> float:
    ys = np.stack([softmax(S[i], temperature) for i in range(B)])
    yt = np.stack([softmax(T_[i], temperature) for i in range(B)])
    inter = np.mean([1 - pearson(ys[i], yt[i]) for i in range(B)])
    intra = np.mean([1 - pearson(ys[:, c], yt[:, c]) for c in range(C)])
    return temperature**2 * (beta * inter + gamma * intra)


def tensors(dtype=torch.float32):
    return torch.tensor(S, dtype=dtype), torch.tensor(T_, dtype=dtype), torch.tensor(Y)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
def test_kd_matches_hinton_formula(temperature):
    s, t, _ = tensors()
    assert kd_loss(s, t, temperature).item() == pytest.approx(reference_kd(temperature), rel=1e-5)


@pytest.mark.parametrize("temperature, alpha, beta", [(1.0, 1.0, 8.0), (4.0, 0.5, 0.5)])
def test_dkd_matches_decoupled_formula(temperature, alpha, beta):
    s, t, y = tensors()
    assert dkd_loss(s, t, y, temperature, alpha, beta).item() == \
        pytest.approx(reference_dkd(temperature, alpha, beta), rel=1e-5)


def test_dkd_with_unit_weights_recovers_kd_decomposition():
    # The paper's identity: KD = TCKD + (1 - p_t,y) * NCKD; with beta = 1 - p_t,y per sample the
    # sum equals KD exactly. Checked for one sample.
    s, t, y = tensors(torch.float64)
    temperature = 2.0
    p_target = torch.softmax(t[:1] / temperature, dim=1)[0, y[0]].item()
    dkd = dkd_loss(s[:1], t[:1], y[:1], temperature, 1.0, 1.0 - p_target)
    assert dkd.item() == pytest.approx(kd_loss(s[:1], t[:1], temperature).item(), rel=1e-5)


@pytest.mark.parametrize("temperature, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_dist_matches_pearson_relation_formula(temperature, beta, gamma):
    s, t, _ = tensors()
    assert dist_loss(s, t, temperature, beta, gamma).item() == \
        pytest.approx(reference_dist(temperature, beta, gamma), rel=1e-4)


def test_losses_are_zero_when_student_equals_teacher():
    s, _, y = tensors()
    assert kd_loss(s, s, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert dkd_loss(s, s, y, 3.0, 1.0, 8.0).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(s, s, 3.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-5)


def test_fp16_logits_do_not_overflow():
    # The original hand-written softmax overflowed under fp16; logits of magnitude 60 000 are
    # still finite in fp16 and must give finite losses.
    s, t, y = tensors()
    s16, t16 = (s * 8000).half(), (t * 8000).half()
    assert torch.isfinite(s16).all()
    for value in (kd_loss(s16, t16, 3.0), dkd_loss(s16, t16, y, 3.0, 1.0, 8.0), dist_loss(s16, t16, 3.0, 1, 1)):
        assert value.dtype == torch.float32 and torch.isfinite(value)


def test_each_term_gives_the_student_finite_nonzero_gradients():
    """(That the teacher gets none is the step's job: tests/test_distill.py pins it.)"""
    s, t, y = tensors()
    s.requires_grad_(True)
    for cfg_loss in ("kd", "dkd", "dist"):
        cfg = DistillConfig(teacher=TeacherConfig(arch="resnet18", checkpoint="t.pt"), loss=cfg_loss)
        s.grad = None
        distillation_term(cfg)(s, t, y).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, cfg_loss


def z_scored(rows: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its standard deviation with Bessel's correction (the paper's code)."""
    return (rows - rows.mean(axis=1, keepdims=True)) / (rows.std(axis=1, ddof=1, keepdims=True) + 1e-7)


@pytest.mark.parametrize("loss", ["kd", "dkd", "dist"])
def test_logit_standardization_z_scores_each_sample_before_the_temperature(loss):
    """Sun et al. (CVPR 2024): the logit term of z-scored logits. Against the float64 reference; not
    the plain term; and blind to each sample's shift and positive scale of either model's logits."""
    teacher = TeacherConfig(arch="resnet18", checkpoint="t.pt")
    standardized = distillation_term(DistillConfig(teacher=teacher, loss=loss, temperature=2.0,
                                                   logit_standardization=True))
    plain = distillation_term(DistillConfig(teacher=teacher, loss=loss, temperature=2.0))
    s, t, y = torch.from_numpy(S), torch.from_numpy(T_), torch.from_numpy(Y)
    got = standardized(s, t, y)
    reference = plain(torch.from_numpy(z_scored(S)), torch.from_numpy(z_scored(T_)), y)
    if loss == "kd":  # the explicit sum of the paper's formula: T^2 KL(softmax(Z(t)/T) || softmax(Z(s)/T))
        zs, zt = z_scored(S), z_scored(T_)
        explicit = 2.0**2 * sum(kl(softmax(zt[i], 2.0), softmax(zs[i], 2.0)) for i in range(B)) / B
        assert float(got) == pytest.approx(explicit, rel=1e-5)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain(s, t, y), rtol=1e-3)
    shift, scale = torch.from_numpy(rng.normal(0, 5, size=(B, 1))), torch.from_numpy(rng.uniform(0.2, 5, size=(B, 1)))
    torch.testing.assert_close(standardized(s * scale + shift, t * scale.flip(0) - shift, y), got, rtol=1e-4, atol=1e-5)
