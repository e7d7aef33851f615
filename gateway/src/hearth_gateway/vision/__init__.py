"""Vision capabilities: trusted native code (OpenCV, onnxruntime) run in worker processes."""
