"""ECE and the student's mass outside the teacher's top-K, on hand-computed examples."""

from __future__ import annotations

import math

import torch

from fusion_cache.eval.calibration import calibration_error
from fusion_cache.eval.calibration import tail_mass_outside
from fusion_cache.eval.calibration import top1_calibration_inputs


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.95 and 0.99 share bin 14, 0.5 sits in bin 7, 0.1 in bin 1
    conf = torch.tensor([0.95, 0.99, 0.5, 0.1])
    correct = torch.tensor([True, False, True, False])
    # bin 14: |mean conf 0.97 - acc 0.5| * 2/4; bin 7: |0.5 - 1| * 1/4; bin 1: |0.1 - 0| * 1/4
    want = 0.47 * 2 / 4 + 0.5 / 4 + 0.1 / 4
    assert math.isclose(calibration_error(conf, correct), want, rel_tol=1e-6)  # the inputs are fp32


def test_ece_of_a_calibrated_bin_is_zero_and_empty_input_is_zero():
    assert calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.0
    assert calibration_error(torch.tensor([]), torch.tensor([], dtype=torch.bool)) == 0.0


def test_top1_inputs_and_tail_mass():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    conf, correct = top1_calibration_inputs(logits, torch.tensor([0, 0]))
    torch.testing.assert_close(conf, torch.tensor([0.7, 0.6]))
    assert correct.tolist() == [True, False]
    tail = tail_mass_outside(logits, torch.tensor([[0, -1], [2, 1]]))
    torch.testing.assert_close(tail, torch.tensor([0.3, 0.1]))
