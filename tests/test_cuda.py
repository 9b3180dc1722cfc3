"""What only a CUDA GPU shows: bf16 autocast codes, a fine-tune under AMP whose weights load on a
CPU, and an out-of-memory that halves the micro-batch instead of ending the run. Skipped without a
GPU (CI has none); bench/gpu_check.sh runs them on one."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlpipe.config import FinetuneConfig
from tlpipe.models import CodeExtractor, create_backbone, extract_codes
from tlpipe.training.finetune import Finetuner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)


def learnable(n: int, size: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, size, size, generator=g) + labels.view(-1, 1, 1, 1) * 0.5
    return TensorDataset(images, labels)


def test_codes_under_cuda_bf16_autocast_point_where_the_cpu_codes_do():
    model = create_backbone().model
    loader = DataLoader(learnable(16, 224), batch_size=8)
    on_cpu, labels = extract_codes(CodeExtractor(model), loader, torch.device("cpu"), onnx_runtime=False)
    on_gpu, gpu_labels = extract_codes(CodeExtractor(model), loader, CUDA)
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(on_cpu), torch.from_numpy(on_gpu), dim=1)
    assert (gpu_labels == labels).all() and on_gpu.dtype == on_cpu.dtype
    assert cosine.min() > 0.99, cosine


def test_a_fine_tune_under_amp_learns_and_its_float32_weights_give_the_same_logits_on_cpu():
    model = create_backbone().model
    model.reset_classifier(3)
    data = learnable(48, 96)
    tuner = Finetuner(FinetuneConfig(epochs=4, lr=1e-3, patience=5), CUDA).fit(
        model, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=24))
    assert tuner.history_[-1]["val_accuracy"] > 0.6, tuner.history_
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    images = data.tensors[0][:8]
    with torch.inference_mode():
        on_gpu = model.eval()(images.to(CUDA)).cpu()
        on_cpu = model.cpu()(images)
    assert torch.allclose(on_gpu, on_cpu, atol=1e-2, rtol=1e-2)


def test_an_out_of_memory_halves_the_micro_batch_and_the_epoch_finishes():
    model = create_backbone().model
    model.reset_classifier(3)
    model.to(CUDA)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    room = torch.cuda.memory_allocated(CUDA) + 1.5 * 2**30  # 256 images of 224 px need several GiB; 16 fit
    torch.cuda.set_per_process_memory_fraction(room / total, CUDA)
    try:
        data = learnable(256, 224)
        tuner = Finetuner(FinetuneConfig(epochs=1, lr=1e-3), CUDA).fit(
            model, DataLoader(data, batch_size=256), DataLoader(data, batch_size=32))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()
    assert tuner.oom_events_ and tuner.micro_batch < 256, tuner.oom_events_
    assert tuner.oom_events_[0] == {"batch": 256, "micro_batch": 128}
    assert len(tuner.history_) == 1 and torch.isfinite(torch.tensor(tuner.history_[0]["train_loss"]))
