"""A model on an evaluation set: loss, accuracy, error, per-class accuracy and expected calibration
error, summed on the device and read with one host sync. train.py logs the first three after
every epoch; evaluate.py reports them all for a checkpoint. One function serves both, so a finished
run's test accuracy and evaluate.py's are computed the same way."""

import torch
import torch.nn.functional as F

ECE_BINS = 15  # equal-width confidence bins, as Guo et al. 2017 ("On Calibration of Modern Neural Networks")


@torch.no_grad()
def evaluate_loader(forward, loader, autocast, num_classes, mark=lambda: None):
    """forward: images -> logits; loader yields (images, labels) and has .labels; autocast: a context
    factory; mark: called before each forward (a new CUDA-graph step under --compile reduce-overhead)."""
    device = loader.labels.device
    totals = torch.zeros(2, dtype=torch.float64, device=device)                  # loss sum, correct
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)  # correct, images
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)          # images, confidence, correct
    for images, labels in loader:
        mark()
        with autocast():
            logits = forward(images)
        logits = logits.float()
        predicted = logits.argmax(1)
        hit = (predicted == labels).double()
        confidence = logits.softmax(1).gather(1, predicted[:, None])[:, 0].double()
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), hit.sum()])
        per_class[0].index_add_(0, labels, hit)
        per_class[1].index_add_(0, labels, torch.ones_like(hit))
        which = (confidence * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1  # (k/B, (k+1)/B] -> k
        for row, values in enumerate((torch.ones_like(hit), confidence, hit)):
            bins[row].index_add_(0, which, values)
    totals, per_class, bins = (t.cpu() for t in (totals, per_class, bins))  # the one host sync
    n = len(loader.labels)
    loss, correct = (totals / n).tolist()
    ece = float((bins[1] - bins[2]).abs().sum() / n)  # sum over bins of |confidence - accuracy| x share
    return {"loss": loss, "acc": correct, "error": 1 - correct, "ece": ece,
            "per_class_acc": (per_class[0] / per_class[1].clamp(min=1)).tolist(),
            "per_class_images": per_class[1].long().tolist(), "images": n}
