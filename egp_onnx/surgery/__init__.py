"""Graph surgery: turn the calibration statistics of a pruned model into a shallower graph.

Only this package imports onnx_graphsurgeon.
"""

from egp_onnx.surgery.rewrites import ChannelStates, SurgeryResult, simplify

__all__ = ["ChannelStates", "SurgeryResult", "simplify"]
