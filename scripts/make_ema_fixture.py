#!/usr/bin/env python3
"""Build tests/fixtures/ema/ema.json: torchvision's EMA rule run by torch itself.

    /tmp/refenv/bin/python scripts/make_ema_fixture.py

torchvision's classification reference (which the paper's finetuning uses) keeps
`ExponentialMovingAverage(AveragedModel)` with `use_buffers=True` and the decay adjusted to
`1 - min(1, (1 - decay) * batch_size * steps / epochs)`, updates it when the batch index within
the epoch is a multiple of `steps`, and resets `n_averaged` after each update of a warm-up epoch.
Here the "training" sets every parameter and buffer of a Linear + BatchNorm1d model to a known
value at each global step s (tensor t of the list below, element j):

    value = sin(0.37 * s + 1.3 * j + 0.5 * t)

and the averaged state after each epoch is recorded. tests/finetune.rs replays the same
trajectory through mono's EMA.
"""
import json
import math
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ema" / "ema.json"
EPOCHS, STEPS_PER_EPOCH, EMA_STEPS, WARMUP_EPOCHS, BATCH, DECAY = 3, 7, 3, 1, 8, 0.99


class ExponentialMovingAverage(AveragedModel):
    """torchvision's references/classification/utils.py class, restated."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg, param, num_averaged):
            return decay * avg + (1 - decay) * param

        super().__init__(model, device, ema_avg, use_buffers=True)


def main():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    adjust = BATCH * EMA_STEPS / EPOCHS
    alpha = min(1.0, (1.0 - DECAY) * adjust)
    ema = ExponentialMovingAverage(model, decay=1.0 - alpha)
    initial = {n: tensors[n].detach().flatten().tolist() for n in names}
    after_epoch = []
    step = 0
    for epoch in range(EPOCHS):
        for i in range(STEPS_PER_EPOCH):
            with torch.no_grad():
                for t, n in enumerate(names):
                    flat = tensors[n].view(-1)
                    for j in range(flat.numel()):
                        flat[j] = math.sin(0.37 * step + 1.3 * j + 0.5 * t)
            step += 1
            if i % EMA_STEPS == 0:
                ema.update_parameters(model)
                if epoch < WARMUP_EPOCHS:
                    ema.n_averaged.fill_(0)
        state = dict(ema.module.named_parameters()) | dict(ema.module.named_buffers())
        after_epoch.append({n: state[n].detach().flatten().tolist() for n in names})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "generator": "/tmp/refenv/bin/python scripts/make_ema_fixture.py", "torch": torch.__version__,
        "epochs": EPOCHS, "steps_per_epoch": STEPS_PER_EPOCH, "ema_steps": EMA_STEPS,
        "warmup_epochs": WARMUP_EPOCHS, "batch_size": BATCH, "ema_decay": DECAY,
        "names": names, "shapes": {n: list(tensors[n].shape) for n in names},
        "initial": initial, "after_epoch": after_epoch,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
