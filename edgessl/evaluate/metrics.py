"""Classification metrics from integer predictions (pure torch, no scikit-learn).

Conventions (the same as scikit-learn's defaults):
- balanced accuracy = mean recall over the classes that occur in y_true;
- macro F1 = mean F1 over the classes that occur in y_true or y_pred;
- a precision, recall or F1 whose denominator is 0 counts as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(y_true: Tensor, y_pred: Tensor, num_classes: int) -> Tensor:
    """y_true, y_pred: (N,) long in [0, C) -> (C, C) long counts; row = true class, column = predicted class."""
    idx = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    den = den.double()
    return torch.where(den > 0, num.double() / den.clamp(min=1e-300), torch.zeros_like(den))


def per_class_scores(cm: Tensor) -> dict[str, Tensor]:
    """cm: (C, C) confusion matrix -> {"precision", "recall", "f1": (C,) float64, "support": (C,) long}.

    precision_c = cm[c, c] / sum_i cm[i, c];  recall_c = cm[c, c] / sum_j cm[c, j];
    f1_c = 2 p r / (p + r); each is 0 where its denominator is 0."""
    tp = cm.diagonal()
    predicted = cm.sum(dim=0)
    support = cm.sum(dim=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def top1(y_true: Tensor, y_pred: Tensor) -> float:
    """Fraction of (N,) predictions equal to the (N,) labels, in [0, 1]."""
    return float((y_true.long() == y_pred.long()).double().mean()) if len(y_true) else 0.0


def balanced_accuracy(y_true: Tensor, y_pred: Tensor, num_classes: int) -> float:
    """Mean per-class recall over the classes present in y_true (N,), in [0, 1]."""
    scores = per_class_scores(confusion_matrix(y_true, y_pred, num_classes))
    present = scores["support"] > 0
    return float(scores["recall"][present].mean()) if present.any() else 0.0


def macro_f1(y_true: Tensor, y_pred: Tensor, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in y_true or y_pred (N,), in [0, 1]."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    scores = per_class_scores(cm)
    present = (cm.sum(dim=0) + cm.sum(dim=1)) > 0
    return float(scores["f1"][present].mean()) if present.any() else 0.0


def classification_metrics(y_true: Tensor, y_pred: Tensor, num_classes: int) -> dict[str, float]:
    """{"top1", "balanced_accuracy", "macro_f1"} of (N,) predictions, each in [0, 1]."""
    return {
        "top1": top1(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
    }
