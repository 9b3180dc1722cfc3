"""Memory accounting for a training batch, and gradient accumulation in micro-batches."""
from __future__ import annotations

import torch

from tlpipe.config import FinetuneConfig
from tlpipe.models import create_backbone
from tlpipe.training.finetune import Finetuner
from tlpipe.training.layers import freeze_stages
from tlpipe.training.memory import MemoryEstimate, estimate_memory


def test_estimate_counts_params_grads_adamw_state_and_activations_without_touching_the_model():
    model = create_backbone().model
    model.reset_classifier(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = estimate_memory(model, (3, 96, 96), torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    assert full.fixed_bytes == 4 * n_params * 4  # weights, gradients, two AdamW moments (float32)
    assert full.per_image_bytes > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN stats untouched
    freeze_stages(model, 0)
    partial = estimate_memory(model, (3, 96, 96), torch.device("cpu"))
    assert partial.fixed_bytes < full.fixed_bytes
    bigger = estimate_memory(model, (3, 192, 192), torch.device("cpu"))
    assert 3 * partial.per_image_bytes < bigger.per_image_bytes  # activations grow with the pixels


def test_largest_batch_fits_the_memory_and_respects_the_cap():
    estimate = MemoryEstimate(fixed_bytes=1000, per_image_bytes=100)
    assert estimate.largest_batch(available_bytes=10_000, cap=512) == 70  # 0.8 * 10000 - 1000 = 7000
    assert estimate.largest_batch(available_bytes=10_000, cap=16) == 16
    assert estimate.largest_batch(available_bytes=500, cap=16) == 1


def test_a_fine_tune_in_micro_batches_takes_the_same_step_as_in_whole_batches(backbone):
    """One AdamW step of a full fine-tune, its batch of 8 in micro-batches of 3 or whole: the same loss,
    the same weights (the step follows the gradients' signs, so parts not weighted by their size, or a
    gradient reset between parts, moves them)."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 64, 64, generator=g), torch.arange(8) % 2
    model = copy.deepcopy(backbone.model)
    model.reset_classifier(2)
    model.drop_rate = 0.0  # no dropout: both runs compute the same function
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = DataLoader(TensorDataset(images, labels), batch_size=8), DataLoader(TensorDataset(images[:2], labels[:2]))
    config = FinetuneConfig(epochs=1, warmup_epochs=0, weight_decay=0.0)  # BN statistics frozen: the recipe's default
    runs = []
    for micro in (None, 3):  # 3 does not divide 8: uneven parts are weighted by their size
        tuned = copy.deepcopy(model)
        tuner = Finetuner(config, torch.device("cpu"), micro_batch=micro).fit(tuned, train, val)
        runs.append((tuner.first_batch_loss_, {k: v - start[k] for k, v in tuned.state_dict().items() if v.is_floating_point()}))
    (loss_whole, whole), (loss_micro, micro) = runs
    assert abs(loss_whole - loss_micro) < 1e-5
    moved = sum(float((step ** 2).sum()) for step in whole.values())
    apart = sum(float(((micro[name] - step) ** 2).sum()) for name, step in whole.items())
    assert moved > 0 and (apart / moved) ** 0.5 < 1e-3  # measured: 6e-5 (float sums in another order)
