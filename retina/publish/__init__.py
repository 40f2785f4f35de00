"""Releasing nets into models/ with their cards, and the ONNX export."""
