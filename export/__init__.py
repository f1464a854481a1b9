"""zeroship export: a run's winning checkpoint → verified ONNX bundle, and a torch-free runtime."""
