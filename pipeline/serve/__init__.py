"""Serving: ONNX export and batch prediction."""
