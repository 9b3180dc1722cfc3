"""The class-weighted loss of fine-tuning (``class_weights``) on real checked datasets."""
from __future__ import annotations

import pytest

from tlpipe.data import prepare_dataset
from tlpipe.training.fits import class_weights


def test_inverse_frequency_weights_when_on_and_auto_only_over_three_to_one(image_folder):
    over = prepare_dataset(image_folder("over", {"cats": 8, "dogs": 2}), hold_out=False)  # 4:1
    weights = class_weights(over, "auto")
    assert weights.tolist() == pytest.approx([10 / (2 * 8), 10 / (2 * 2)])  # n / (classes x count)
    assert (weights * weights.new_tensor([8, 2])).tolist() == pytest.approx([5, 5])  # each class weighs the same
    assert class_weights(over, "on").tolist() == weights.tolist()
    assert class_weights(over, "off") is None

    at_three = prepare_dataset(image_folder("three", {"cats": 6, "dogs": 2}), hold_out=False)  # 3:1 is not over 3
    assert class_weights(at_three, "auto") is None
    assert class_weights(at_three, "on").tolist() == pytest.approx([8 / 12, 8 / 4])
    balanced = prepare_dataset(image_folder("even", {"cats": 3, "dogs": 3}), hold_out=False)
    assert class_weights(balanced, "auto") is None and class_weights(balanced, "on").tolist() == pytest.approx([1, 1])
