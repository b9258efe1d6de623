"""The one home of onnxruntime (sessions, model handles, segment runs) and of process resources."""
