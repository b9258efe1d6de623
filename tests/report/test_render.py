"""The summary's fidelity lines: the estimate of unseen agreement, its interval and its data."""

from __future__ import annotations

from egp_onnx.report.records import Fidelity, OutputFidelity
from egp_onnx.report.render import estimate_line, outputs_table


def fidelity(unseen: bool) -> Fidelity:
    logits = OutputFidelity(
        "logits", 0.1, 0.5, False, kind="classes", agreement=0.998, estimate=0.9952, estimate_low=0.9859,
        estimate_high=0.9993, flips=2, positions=500,
    )  # fmt: skip
    boxes = OutputFidelity("boxes", 0.36, 2.0, False, kind="tensor")
    return Fidelity(
        0.998, 0.36, 2.0, None, None, 500, (logits, boxes), data="eval" if unseen else "holdout",
        estimate=0.9952, estimate_low=0.9859, estimate_high=0.9993, unseen=unseen, estimate_rule="near-flips",
    )  # fmt: skip


def test_the_estimate_line_says_its_interval_and_its_data():
    assert estimate_line(fidelity(False)) == (
        "unseen      top-1 agreement estimated 0.9952 (95%: 0.9859-0.9993) from 500 holdout samples "
        "(near-flips)"
    )
    assert estimate_line(fidelity(True)).endswith(
        "from the agreement on 500 eval samples marked unseen, as is"
    )
    no_classes = Fidelity(None, 0.1, 0.1, None, None, 10, ())
    assert estimate_line(no_classes) == ""


def test_the_outputs_table_has_a_row_per_output_with_its_kind():
    rows = outputs_table(fidelity(False)).splitlines()[2:]
    assert [r.split()[:3] for r in rows] == [["logits", "classes", "0.9980"], ["boxes", "tensor", "-"]]
