"""Linear probe: multinomial logistic regression on standardised frozen features, in torch (CPU or GPU).

Objective, for features x (N, D), labels y (N,), weights W (D, C), bias b (C,):

    J(W, b) = 1/N sum_i CE(x_i W + b, y_i) + l2/2 ||W||_F^2          (the bias is not penalised)

minimised by full-batch L-BFGS (strong Wolfe line search, at most 100 iterations), in float64 up to 2,500 labelled
images and in float32 above (benchmarks/README.md "eval"). In scikit-learn terms l2 = 1 / (C * N). How it is
computed does not change what is minimised: the gradient is closed-form (objective_and_grad, checked against
autograd) with both matrix products in memory order, and with fewer images than feature dimensions the fit runs in
the span of the training rows (row_space: exact, e.g. 100 instead of 1,024 dimensions at 10 labels per class).

The L2 strength is chosen by stratified k-fold cross-validation on the labelled training subset only (never on
the test set): k = min(5, smallest class count); every fold is standardised with its own training part's
statistics; the strength with the highest pooled validation top-1 wins, ties going to the stronger one. The
strengths are tried from strong to weak, each fold's fit warm-started from its fit at the previous strength. Above
2,500 labelled images the sweep stops once `patience` (2) strengths in a row score below the best (the CV curve is
past its peak) and each CV fit of the sweep gets at most 30 L-BFGS iterations, enough to rank the strengths; the
best one and its better neighbour in the grid then get their remaining 70 iterations (continuing) and are re-scored,
so a near-tie on a flat CV curve (two strengths a few validation images apart) is decided as the exact probe decides
it (without this step a 50-iteration cap flipped such a choice in the benchmark); `max_cv_images` can also
cross-validate on a stratified subset (off by default: it moved the chosen strength in the benchmark). The final fit
always uses every labelled image and 100 iterations, starting (above 2,500 images) from the mean of the folds' fits
at the chosen strength (ProbeSettings; REFERENCE: float64, the whole grid, 100 iterations everywhere, cold starts).
When a class has a single labelled image (e.g. 1 label per class) no fold can hold out one of its images while
training on another, so cross-validation is impossible and the fixed fallback l2 = 1 / N is used (scikit-learn's
default C = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from edgessl.seeding import keyed_generator

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_FOLDS = 5
MAX_ITER = 100  # as scikit-learn's lbfgs default
_FOLDS = 0xF01D5


@dataclass(frozen=True)
class ProbeSettings:
    """How the probe computes (not what it minimises): dtype of the fits, how many strengths in a row may score
    below the best before the CV sweep stops, the largest labelled set cross-validated in full, and the labelled
    set size up to which none of this applies (float64, the whole grid: such fits are cheap, and on a few labels
    per class the CV scores of two strengths are often one image apart, so float32 alone can flip the choice)."""

    dtype: torch.dtype = torch.float32
    patience: int = 2
    max_cv_images: int = 10**12
    exact_up_to: int = 2500
    cv_max_iter: int = 30  # L-BFGS iterations of each CV fit in the sweep (the final fit always gets MAX_ITER)
    warm_final: bool = True  # the final fit starts from the mean of the folds' fits at the chosen strength

    def for_size(self, n: int) -> ProbeSettings:
        return REFERENCE if n <= self.exact_up_to else self


# REFERENCE is the probe before these speed-ups (float64, the whole grid, every labelled image in the CV): the eval
# benchmark compares the two on the same features. PROBE is what every call uses unless told otherwise.
REFERENCE = ProbeSettings(torch.float64, patience=len(L2_GRID), max_cv_images=10**12, exact_up_to=0,
                          cv_max_iter=MAX_ITER, warm_final=False)
PROBE = ProbeSettings()


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Centre and scale every feature by the mean and (population) std of `train` (N, D); applied to train and
    to each of `others` (M, D). Constant features (std < eps) are only centred. Returns (train_z, *others_z)."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, unbiased=False, keepdim=True)
    std = torch.where(std < eps, torch.ones_like(std), std)
    return tuple((t - mean) / std for t in (train, *others))


def row_space(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Coordinates in the span of the training rows when there are fewer rows than features (N < D), else the
    inputs unchanged. train: (N, D), others: (M, D) -> (N, r), (M, r) with r = rank <= N.

    Exact for the probe: the gradient of J (module docstring) at any W in span(train rows) stays in it, so the
    minimiser and every L-BFGS iterate from zero (or from a warm start in the span) lie there, and with an
    orthonormal basis Q (D, r) of it, J(Q A) on x equals J(A) on x Q (||Q A|| = ||A||, the bias unchanged). A
    10-labels-per-class subset of 1,024-d features is fitted in 100 dimensions instead of 1,024."""
    n, d = train.shape
    if n >= d:
        return (train, *others)
    q, r = torch.linalg.qr(train.t())  # (D, N) = Q R, Q (D, N) orthonormal
    keep = r.diagonal().abs() > 1e-10 * max(1.0, float(r.diagonal().abs().max()))
    q = q[:, keep]
    return tuple(t @ q for t in (train, *others))


def logistic_objective(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float) -> Tensor:
    """J(W, b) of the module docstring. x: (N, D), y: (N,) long, weight: (D, C), bias: (C,) -> scalar."""
    return F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = MAX_ITER,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise J(W, b) with L-BFGS. x: (N, D), y: (N,) long in [0, C); init: optional (W, b) warm start.

    Returns (W (D, C), b (C,)) in x's floating dtype on x's device. Stops when max |grad| < 1e-5, or after max_iter
    iterations (separable data with a tiny l2 converges slowly, its minimiser running off as l2 -> 0; the cap
    bounds the time and, like scikit-learn's, acts as a little extra regularisation there)."""
    x = x if x.is_floating_point() else x.to(PROBE.dtype)
    y = y.long().to(x.device)
    if init is None:
        weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        weight, bias = (t.detach().to(x.device, x.dtype).clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-5, tolerance_change=1e-10,
        history_size=20, line_search_fn="strong_wolfe",
    )
    xt = x.t().contiguous()  # (D, N): both products below read memory in order (5x faster than x @ W on a CPU)
    onehot = F.one_hot(y, num_classes).to(x.dtype)

    def closure():
        loss, weight.grad, bias.grad = objective_and_grad(x, xt, onehot, weight.detach(), bias.detach(), l2)
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def objective_and_grad(x: Tensor, xt: Tensor, onehot: Tensor, weight: Tensor, bias: Tensor,
                       l2: float) -> tuple[Tensor, Tensor, Tensor]:
    """J(W, b) of the module docstring and its gradients in closed form:

        P = softmax(x W + b),  G = (P - Y) / N,  dJ/dW = x^T G + l2 W,  dJ/db = sum_i G_i

    x: (N, D), xt: x^T contiguous (D, N), onehot: Y (N, C), weight: (D, C), bias: (C,) -> (J, dJ/dW, dJ/db).
    The products are written as (W^T x^T)^T and (G^T x)^T: the same numbers as x @ W and x^T @ G, with both
    operands read in memory order."""
    logits = (weight.t() @ xt).t() + bias
    logp = torch.log_softmax(logits, dim=1)
    n = x.shape[0]
    loss = -(logp * onehot).sum() / n + 0.5 * l2 * weight.pow(2).sum()
    g = (logp.exp() - onehot) / n
    return loss, ((g.t() @ x).t() + l2 * weight).contiguous(), g.sum(dim=0)


def stratified_folds(labels: Tensor, k: int, seed: int) -> Tensor:
    """Fold index in [0, k) of every labelled item. labels: (N,) long -> (N,) long.

    Each class is shuffled (keyed by seed and class) and dealt round-robin, continuing where the previous class
    stopped, so every fold gets floor or ceil of n_c / k items of class c and fold sizes differ by at most one."""
    folds = torch.empty(len(labels), dtype=torch.long)
    turn = 0
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero(as_tuple=True)[0]
        members = members[torch.randperm(len(members), generator=keyed_generator(seed, c, _FOLDS))]
        folds[members] = (torch.arange(len(members)) + turn) % k
        turn = (turn + len(members)) % k
    return folds


@dataclass
class L2Choice:
    """The L2 strength a probe used and how it was chosen."""

    l2: float
    cross_validated: bool
    folds: int = 0
    cv_top1: dict[float, float] = field(default_factory=dict)  # strength -> pooled validation top-1
    start: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # mean fold fit at l2 (ProbeSettings)

    def describe(self) -> str:
        if self.cross_validated:
            return f"l2={self.l2:g} ({self.folds}-fold CV)"
        return f"l2={self.l2:g} (fallback 1/N: a class has a single label, no CV)"


def choose_l2(
    x: Tensor, y: Tensor, num_classes: int, seed: int, grid=L2_GRID, max_folds: int = MAX_FOLDS,
    settings: ProbeSettings | None = None,
) -> L2Choice:
    """Cross-validated L2 strength on labelled features only. x: (N, D) raw (unstandardised), y: (N,) long.

    See the module docstring for the rule, the early stop of the sweep, the subset and the single-label fallback."""
    counts = torch.bincount(y.long())
    smallest = int(counts[counts > 0].min()) if len(y) else 0
    if smallest < 2:
        return L2Choice(1.0 / max(1, len(y)), cross_validated=False)
    k = min(max_folds, smallest)
    settings = (settings or PROBE).for_size(len(y))
    if len(y) > settings.max_cv_images:
        keep = cv_subset(y.cpu(), settings.max_cv_images, seed).to(x.device)
        x, y = x[keep], y[keep]
    folds = stratified_folds(y.cpu(), k, seed).to(x.device)
    dtype = settings.dtype
    parts = [(row_space(*standardize(x[folds != f].to(dtype), x[folds == f].to(dtype))), y[folds != f], y[folds == f])
             for f in range(k)]
    cv_top1, fits = _sweep(parts, num_classes, grid, settings)
    best = _best(cv_top1)
    if settings.cv_max_iter < MAX_ITER:  # the capped fits ranked the strengths; the two best adjacent ones get
        best = _refine(parts, num_classes, cv_top1, fits, best, MAX_ITER - settings.cv_max_iter)  # their remaining
        # iterations before the choice
    start = None
    if settings.warm_final and parts[0][0][0].shape[1] == x.shape[1]:  # fits in the features' coordinates
        start = (torch.stack([w for w, _ in fits[best]]).mean(0), torch.stack([b for _, b in fits[best]]).mean(0))
    return L2Choice(best, cross_validated=True, folds=k, cv_top1=cv_top1, start=start)


def _cv_score(parts, fits) -> int:
    """Validation images right, pooled over the folds. parts: [((x_train, x_val), y_train, y_val)], fits: [(W, b)]."""
    return sum(int(((xva @ w + b).argmax(dim=1) == yva.to(xva.device)).sum())
               for ((_, xva), _, yva), (w, b) in zip(parts, fits, strict=True))


def _best(cv_top1: dict[float, float]) -> float:
    """The strength with the highest CV top-1; ties go to the stronger one."""
    return max(sorted(cv_top1, reverse=True), key=lambda s: cv_top1[s])


def _sweep(parts, num_classes: int, grid, settings: ProbeSettings):
    """CV top-1 of the strengths from strong to weak (each fold warm-started from its previous fit, at most
    settings.cv_max_iter iterations), stopping `patience` strengths past the best. -> ({l2: top-1}, {l2: fits})."""
    n = sum(len(yva) for _, _, yva in parts)
    inits: list = [None] * len(parts)
    cv_top1: dict[float, float] = {}
    fits: dict[float, list] = {}
    best, behind = None, 0
    for s in sorted(grid, reverse=True):
        inits = [fit_logistic(xtr, ytr, num_classes, s, max_iter=settings.cv_max_iter, init=init)
                 for ((xtr, _), ytr, _), init in zip(parts, inits, strict=True)]
        fits[s], cv_top1[s] = inits, _cv_score(parts, inits) / n
        if best is None or cv_top1[s] > cv_top1[best]:  # ties keep the stronger, tried first
            best, behind = s, 0
        else:
            behind += 1
            if behind >= settings.patience:
                break
    return cv_top1, fits


def _refine(parts, num_classes: int, cv_top1: dict[float, float], fits: dict[float, list], best: float,
            more: int) -> float:
    """Give the best strength and its better neighbour in the grid `more` iterations (MAX_ITER - cv_max_iter,
    continuing from their fits) and re-score both: near-ties on a flat CV curve (a few images apart)
    are then decided as the exact probe would decide them. Updates cv_top1 and fits; returns the choice."""
    order = sorted(cv_top1, reverse=True)
    i = order.index(best)
    neighbours = [order[j] for j in (i - 1, i + 1) if 0 <= j < len(order)]
    pair = [best, max(neighbours, key=lambda s: cv_top1[s])] if neighbours else [best]
    n = sum(len(yva) for _, _, yva in parts)
    for s in pair:
        fits[s] = [fit_logistic(xtr, ytr, num_classes, s, max_iter=more, init=init)
                   for ((xtr, _), ytr, _), init in zip(parts, fits[s], strict=True)]
        cv_top1[s] = _cv_score(parts, fits[s]) / n
    return _best({s: cv_top1[s] for s in pair})


def cv_subset(labels: Tensor, size: int, seed: int) -> Tensor:
    """Indices (size,) of a stratified subset: each class keeps round(size * n_c / N) of its items (at least 2),
    chosen by a generator keyed by (seed, class)."""
    out = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero(as_tuple=True)[0]
        take = max(2, round(size * len(members) / len(labels)))
        out.append(members[torch.randperm(len(members), generator=keyed_generator(seed, c, _FOLDS + 1))[:take]])
    return torch.cat(out).sort().values


@dataclass
class ProbeResult:
    logits: Tensor  # (M, C) test logits
    choice: L2Choice


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    num_classes: int,
    seed: int = 0,
    grid=L2_GRID,
    max_folds: int = MAX_FOLDS,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """Fit the probe on labelled features and score the test features.

    train_x: (N, D), train_y: (N,) long, test_x: (M, D). Both are standardised with train_x's statistics;
    l2 by choose_l2 on (train_x, train_y) alone. Returns the (M, C) test logits and the L2 choice."""
    settings = (settings or PROBE).for_size(len(train_y))
    choice = choose_l2(train_x, train_y, num_classes, seed, grid, max_folds, settings)
    dtype = settings.dtype
    xtr, xte = row_space(*standardize(train_x.to(dtype), test_x.to(dtype).to(train_x.device)))
    weight, bias = fit_logistic(xtr, train_y, num_classes, choice.l2, init=choice.start)
    return ProbeResult(xte @ weight + bias, choice)
