"""Memory accounting for a training batch, and gradient accumulation in micro-batches."""
from __future__ import annotations

import torch

from tlpipe.config import FinetuneConfig
from tlpipe.models import create_backbone
from tlpipe.training.finetune import Finetuner, freeze_stages
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


def test_micro_batches_accumulate_to_the_same_gradients_as_whole_batches():
    from torch import nn

    from tlpipe.training.finetune import Precision, train_mode

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 64, 64, generator=g), torch.arange(8) % 2
    model = create_backbone().model
    model.reset_classifier(2)
    model.drop_rate = 0.0  # no dropout: both passes compute the same function
    train_mode(model, freeze_bn_stats=True)  # BN statistics kept, so splitting the batch changes nothing
    optimizer = torch.optim.AdamW(model.parameters())
    gradients = []
    for micro in (None, 3):  # 3 does not divide 8: uneven parts are weighted by their size
        tuner = Finetuner(FinetuneConfig(), torch.device("cpu"), micro_batch=micro)
        loss = tuner._accumulate(model, images, labels, nn.CrossEntropyLoss(), Precision(torch.device("cpu")), optimizer)
        gradients.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_whole, whole), (loss_micro, micro) = gradients
    assert abs(loss_whole - loss_micro) < 1e-5
    for name, grad in whole.items():
        torch.testing.assert_close(micro[name], grad, rtol=1e-3, atol=1e-6 * grad.abs().max().item() + 1e-9)
