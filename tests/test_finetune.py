"""The fine-tuning engine on the real backbone, tiny inputs: freezing, checkpoints, resume."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlpipe.config import FinetuneConfig
from tlpipe.models import create_backbone
from tlpipe.training.checkpoint import CHECKPOINT
from tlpipe.training.finetune import Finetuner
from tlpipe.training.layers import freeze_stages, stage_groups


def loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(24, 3, 64, 64, generator=g)
    labels = torch.arange(24) % 3
    images += labels.view(-1, 1, 1, 1) * 0.5  # learnable
    data = TensorDataset(images, labels)
    return DataLoader(data, batch_size=8, shuffle=False), DataLoader(data, batch_size=12)


@pytest.fixture
def model():
    m = create_backbone().model
    m.reset_classifier(3)
    return m


def test_partial_fine_tune_leaves_frozen_tensors_and_batchnorm_stats_bitwise_unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = loaders()
    config = FinetuneConfig(epochs=1, lr=1e-2, freeze_bn_stats=False)  # trainable stages update their BN stats
    Finetuner(config, torch.device("cpu"), unfreeze_stages=2).fit(model, train, val)
    groups = stage_groups(model)
    frozen_prefixes = {name.rsplit(".", 1)[0] for group in groups[: len(groups) - 1 - 2] for name in group}
    after = model.state_dict()
    frozen = [k for k in after if k.rsplit(".", 1)[0] in frozen_prefixes]
    trainable = [k for k in after if k not in frozen]
    assert any("running_mean" in k for k in frozen) and any("running_var" in k for k in frozen)
    for key in frozen:  # weights, biases, running means/vars and batch counters alike
        assert torch.equal(before[key], after[key]), key
    changed = [k for k in trainable if not torch.equal(before[k], after[k])]
    assert "classifier.weight" in changed and any(k.startswith("blocks.6") for k in changed)
    assert any(k.startswith("blocks.6") and "running_mean" in k for k in changed)


def test_frozen_batchnorm_statistics_stay_put_everywhere_when_asked(model):
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    train, val = loaders()
    Finetuner(FinetuneConfig(epochs=1, lr=1e-2, freeze_bn_stats=True), torch.device("cpu")).fit(model, train, val)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert not torch.equal(model.state_dict()["blocks.6.0.conv_pw.weight"], create_backbone().model.state_dict()["blocks.6.0.conv_pw.weight"])


def test_parameter_counts_add_up(model):
    total = sum(p.numel() for p in model.parameters())
    counts = freeze_stages(model, 0)
    assert counts["trainable"] + counts["frozen"] == total and 0 < counts["trainable"] < total
    assert freeze_stages(model, None) == {"trainable": total, "frozen": 0}


def test_finished_run_is_not_trained_again_and_checkpoints_load_without_pickle(model, tmp_path):
    train, val = loaders()
    config = FinetuneConfig(epochs=2, lr=1e-3, patience=5)
    first = Finetuner(config, torch.device("cpu"), checkpoint_dir=tmp_path).fit(model, train, val)
    assert len(first.history_) == 2 and first.resumed_from_ == 0
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["state"]["done"] and saved["state"]["epoch"] == 2
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = Finetuner(config, torch.device("cpu"), checkpoint_dir=tmp_path).fit(model, train, val)
    assert again.resumed_from_ == 2 and again.history_ == first.history_
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_resume_after_an_interrupted_epoch_matches_an_uninterrupted_run(tmp_path):
    """Interrupt after epoch 1 (as a kill would, between checkpoints), resume, compare to a straight run."""
    def fresh():
        m = create_backbone().model
        m.reset_classifier(3)
        return m

    config = FinetuneConfig(epochs=3, lr=1e-3, patience=5, deterministic=True)
    train, val = loaders()
    torch.manual_seed(0)
    straight = fresh()
    Finetuner(config, torch.device("cpu")).fit(straight, train, val)

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Interrupt

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        Finetuner(config, torch.device("cpu"), checkpoint_dir=tmp_path, on_epoch=stop_after_first).fit(fresh(), train, val)
    resumed = fresh()
    tuner = Finetuner(config, torch.device("cpu"), checkpoint_dir=tmp_path).fit(resumed, train, val)
    assert tuner.resumed_from_ == 1
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_checkpoint_of_another_run_is_not_resumed(model, tmp_path):
    train, val = loaders()
    config = FinetuneConfig(epochs=1, lr=1e-3)
    Finetuner(config, torch.device("cpu"), checkpoint_dir=tmp_path, fingerprint="run A").fit(model, train, val)
    other = Finetuner(config, torch.device("cpu"), checkpoint_dir=tmp_path, fingerprint="run B").fit(model, train, val)
    assert other.resumed_from_ == 0 and len(other.history_) == 1


def test_a_resumed_run_keeps_the_batch_size_it_started_with(tmp_path):
    from tlpipe.training.checkpoint import Checkpoints

    run = Checkpoints(tmp_path, "run A")
    assert run.started_batch(32, fits=False) == 32  # the first start: kept for a resume
    assert run.started_batch(64, fits=False) == 32  # more memory free now: the batch its LR schedule was counted with
    assert run.started_batch(8, fits=True) == 32  # less on a GPU: micro-batches absorb it
    assert run.started_batch(8, fits=False) == 8  # less on a CPU: never more than fits now
    assert Checkpoints(tmp_path, "run B").started_batch(16, fits=False) == 16  # another run: its own


def _partial_fit(backbone, root, out, augment):
    import copy
    import dataclasses

    from tlpipe.config import load_config
    from tlpipe.data import prepare_dataset
    from tlpipe.models import PENULTIMATE, dataset_codes
    from tlpipe.training.fits import fit_finetune

    config = load_config("default", strategy="partial", image_size=64, num_workers=0, batch_size=8,
                         finetune={"epochs": 2, "unfreeze_stages": 2, "lr": 1e-2}, augment=augment)
    spec = prepare_dataset(root)
    fresh = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model), data_config=copy.deepcopy(backbone.data_config))
    fresh.data_config["input_size"] = (3, 64, 64)
    codes = {split: dataset_codes(fresh, spec, split, config, PENULTIMATE) for split in ("train", "val")}
    return fit_finetune(fresh, spec, config, out, codes)


OFF = {"crop_scale": [1.0, 1.0], "hflip": 0, "affine_p": 0, "color_p": 0}


@pytest.mark.parametrize("augment, reused", [({}, ["val"]), (OFF, ["train", "val"])])
def test_partial_fine_tune_runs_its_frozen_stages_once_with_the_same_result(backbone, image_folder, tmp_path, monkeypatch,
                                                                           augment, reused):
    """Val's frozen-stage outputs (and train's, augmentation off) are computed once and reused: the
    epochs' losses and accuracies are those of the plain path, which runs every image through every stage."""
    from tlpipe.training import frozen

    root = image_folder("d", {"a": 10, "b": 10, "c": 10}, split={"train": 10, "val": 4})
    cached = _partial_fit(backbone, root, tmp_path / "cached", augment)
    assert cached.details["frozen_outputs_reused"] == reused
    monkeypatch.setattr(frozen.FrozenPrefix, "find", classmethod(lambda cls, *args: None))
    plain = _partial_fit(backbone, root, tmp_path / "plain", augment)
    assert plain.details["frozen_outputs_reused"] == []
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [e[key] for e in cached.history] == pytest.approx([e[key] for e in plain.history], rel=1e-4, abs=1e-5), key
    assert cached.head.weight == pytest.approx(plain.head.weight, abs=1e-4)


def test_frozen_prefix_is_proven_on_the_model_and_left_intact(model):
    from tlpipe.training.frozen import FrozenPrefix

    freeze_stages(model, 2)
    prefix = FrozenPrefix.find(model, (3, 64, 64), torch.device("cpu"))
    assert [name for _, name in prefix.slots] == ["conv_stem", "bn1", "0", "1", "2", "3", "4"]
    images = torch.randn(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(images)
        with prefix.skipped():
            assert torch.allclose(model(prefix.run(images)), expected, atol=1e-5)
        assert torch.equal(model(images), expected)  # every module back in place
    freeze_stages(model, None)  # nothing frozen: nothing to reuse
    assert FrozenPrefix.find(model, (3, 64, 64), torch.device("cpu")) is None
