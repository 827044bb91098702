"""Distillation losses: pure functions of tensors, computed in fp32.

The logit terms take student logits `s` and teacher logits `t` of shape `[B, C]` (any float
dtype; cast to fp32 here) and return a scalar; `T` is the temperature. With
`distill.logit_standardization` both are first z-scored per sample (`standardize`). The feature
terms take the student's features after its learned adapter and the teacher's. A run weighs
each term it has:

    loss = ce_weight * CE(s, y) + kd_weight * term(s, t[, y])
           + feature.weight * MSE(proj(f_s), f_t) + hint.weight * MSE(adapt(h_s), h_t)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastkd.config import DistillConfig

# Used instead of -inf to drop the target class from a softmax: exp() of it is exactly 0 in
# fp32, while 0 * (log 0 - log 0) = nan would poison the KL divergence.
_MASKED = -1e9


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): `T^2 * KL(softmax(t/T) || softmax(s/T))`, averaged over the batch.

    `KL(p || q) = sum_c p_c (log p_c - log q_c)`; the `T^2` keeps gradient magnitudes
    comparable across temperatures.
    """
    log_q = F.log_softmax(s.float() / temperature, dim=1)
    log_p = F.log_softmax(t.float() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def _binary_log_probs(z: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] per row, without forming 1 - p (stable)."""
    log_all = torch.logsumexp(z, dim=1)
    log_target = (z * target_mask).sum(dim=1) - log_all
    log_rest = torch.logsumexp(z.masked_fill(target_mask.bool(), _MASKED), dim=1) - log_all
    return torch.stack([log_target, log_rest], dim=1)


def dkd_loss(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float,
             beta: float) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): `alpha * TCKD + beta * NCKD`, batch mean.

    TCKD: `T^2 * KL(b_t || b_s)` over the binary target/non-target probabilities
    `b = [p_y, 1 - p_y]` of `softmax(z/T)`. NCKD: `T^2 * KL(p~_t || p~_s)` over the softmax of
    the non-target logits only (`p~_c = exp(z_c/T) / sum_{k != y} exp(z_k/T)`, `c != y`).
    """
    s, t = s.float() / temperature, t.float() / temperature
    mask = F.one_hot(labels, s.shape[1]).to(s.dtype)
    tckd = F.kl_div(_binary_log_probs(s, mask), _binary_log_probs(t, mask), reduction="batchmean",
                    log_target=True)
    log_q = F.log_softmax(s.masked_fill(mask.bool(), _MASKED), dim=1)
    log_p = F.log_softmax(t.masked_fill(mask.bool(), _MASKED), dim=1)
    nckd = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


def _mean_pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of `1 - pearson(a_i, b_i)`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    correlation = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return (1 - correlation).mean()


def dist_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float, gamma: float) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): `T^2 * (beta * inter + gamma * intra)`.

    With `Y = softmax(z/T)` of shape `[B, C]`, inter-class relation = mean over samples of
    `1 - pearson(Y_s[i, :], Y_t[i, :])`; intra-class relation = mean over classes of
    `1 - pearson(Y_s[:, c], Y_t[:, c])`.
    """
    y_s = F.softmax(s.float() / temperature, dim=1)
    y_t = F.softmax(t.float() / temperature, dim=1)
    inter = _mean_pearson_distance(y_s, y_t)
    intra = _mean_pearson_distance(y_s.t(), y_t.t())
    return (beta * inter + gamma * intra) * temperature**2


def standardize(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row z-scored over the classes,
    `(z - mean(z)) / (std(z) + eps)`, std with Bessel's correction (the paper's code), in fp32."""
    z = z.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element, in fp32 (timm's feature distillation; FitNets' hint)."""
    return F.mse_loss(student.float(), teacher.float())


def hint_features(student: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The student's adapted feature map at the teacher map's spatial `size` (bilinear when they differ)."""
    if tuple(student.shape[-2:]) == tuple(size):
        return student
    return F.interpolate(student.float(), size=size, mode="bilinear", align_corners=False)


DistillTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def distillation_term(cfg: DistillConfig) -> DistillTerm:
    """The configured logit term as `f(student_logits, teacher_logits, labels)`, on standardized
    logits with `distill.logit_standardization`."""
    temperature = cfg.temperature
    term: DistillTerm
    if cfg.loss == "kd":
        term = lambda s, t, y: kd_loss(s, t, temperature)  # noqa: E731
    elif cfg.loss == "dkd":
        term = lambda s, t, y: dkd_loss(s, t, y, temperature, cfg.dkd_alpha, cfg.dkd_beta)  # noqa: E731
    else:
        term = lambda s, t, y: dist_loss(s, t, temperature, cfg.dist_beta, cfg.dist_gamma)  # noqa: E731
    if not cfg.logit_standardization:
        return term
    return lambda s, t, y: term(standardize(s), standardize(t), y)


def hard_distillation_term(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: the cross-entropy of `s` with the teacher's top class."""
    return F.cross_entropy(s.float(), t.argmax(dim=1))
