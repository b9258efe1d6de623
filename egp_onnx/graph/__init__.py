"""ONNX graphs read, never run: op tables, the layer recogniser, rectifier sites, weights."""
