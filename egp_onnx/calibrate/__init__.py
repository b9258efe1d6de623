"""The statistics pass: probes behind every rectifier (probes.py), counted in onnxruntime (collect.py)."""
