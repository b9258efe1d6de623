"""The surgery rewrites, one module each; importing this package registers them all.

Each module registers one function with :func:`egp_onnx.surgery.registry.register_rewrite`;
:func:`egp_onnx.surgery.simplify` runs them in their registered order until none changes the graph.
"""

from egp_onnx.surgery.rewrites import fold_bn, fold_constant, fold_gate, fold_residual, merge, rectifiers  # noqa: F401
