"""One training step, SAM's two passes or plain SGD. train.py and benchmarks/throughput.py
both run this object, so the benchmark times the real step."""

import contextlib

import torch

from sam import frozen_bn_stats, local_gradients


class TrainStep:
    """`forward` is what runs the batch (maybe compiled); `net` is the module it wraps (maybe
    DDP), used for BatchNorm and gradient-sync control. Returns device tensors: the first
    pass's mean loss, its number of correct predictions, and SAM's ascent gradient norm
    (None for SGD). Nothing here waits for the device."""

    def __init__(self, forward, net, optimizer, criterion, *, sam, autocast, scaler=None, cudagraphs=False):
        self.forward, self.net, self.optimizer, self.criterion = forward, net, optimizer, criterion
        self.sam, self.autocast, self.scaler = sam, autocast, scaler
        # With CUDA graphs each forward replays into the same output buffers: mark every
        # forward as a new step and copy what we keep before the next one.
        self.mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)

    def _loss(self, images, labels):
        self.mark()
        with self.autocast():
            logits = self.forward(images)
            return self.criterion(logits, labels), logits

    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def __call__(self, images, labels):
        with local_gradients(self.net) if self.sam else contextlib.nullcontext():
            loss, logits = self._loss(images, labels)
            self._backward(loss)
        loss_value = loss.detach().clone()
        correct = (logits.detach().argmax(1) == labels).sum()
        if not self.sam:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, correct, None

        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # the ascent norm is of true gradients
        grad_norm = self.optimizer.first_step(zero_grad=True)
        with frozen_bn_stats(self.net):  # running statistics come from the first pass only
            loss2, _ = self._loss(images, labels)
            self._backward(loss2)
        self.optimizer.second_step(zero_grad=True, scaler=self.scaler)
        if self.scaler:
            self.scaler.update()
        return loss_value, correct, grad_norm


@torch.no_grad()
def evaluate(forward, module, loader, autocast, cudagraphs=False):
    """Mean cross-entropy and accuracy over a loader; one host sync at the end."""
    module.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
    correct = torch.zeros((), dtype=torch.int64, device=total_loss.device)
    count = 0
    for images, labels in loader:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            logits = forward(images)
        total_loss += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    module.train()
    return {"loss": total_loss.item() / count, "acc": correct.item() / count}
