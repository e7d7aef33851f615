"""Vision capabilities: trusted native code (OpenCV, onnxruntime) that the gateway runs for
devices in its worker processes (runners/vision.py), one module per capability:

- images.py: header checks and decoding (a decompression bomb is refused, not decoded)
- faces.py, motion.py, features.py, plate.py, odometry.py: the capabilities
- pipeline.py: pre- and postprocessing around an ONNX model for image jobs

The daemon imports only this file (names and versions, for status and mDNS); OpenCV is loaded
by the workers.
"""

from __future__ import annotations

__all__ = ["CAPABILITIES", "STATEFUL"]

# Name -> version of the result format and behaviour. Bump a version when a capability's
# results change in a way a device could notice.
CAPABILITIES: dict[str, str] = {
    "vision.faces": "1",
    "vision.motion": "1",
    "vision.features": "1",
    "vision.plate": "1",
    "vision.odometry": "1",
}

# Capabilities whose state lives in one worker (the stream's background model, the odometry
# session's map): their frames always go to the same worker.
STATEFUL = frozenset({"vision.motion", "vision.odometry"})
