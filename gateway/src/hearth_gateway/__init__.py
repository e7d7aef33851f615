"""Hearth gateway daemon.

The flow of a job, one module per step::

    transport (link.py: MQTT 5, broker.py: managed Mosquitto)
      -> protocol boundary (dispatch.py: size check, decode, validate; imports hearth.protocol)
      -> admission and policy (policy.py: limits and quotas from policies/*.toml)
      -> journal (store.py: SQLite WAL) and blobs (blobs.py: content-addressed files)
      -> workers (workers.py: supervised worker processes) -> runners (runners/: wasm, onnx)
      -> reply stored, then published

discovery.py advertises the gateway over mDNS; daemon.py wires it all together.
"""

from importlib import metadata as _metadata

try:  # one place for the version: gateway/pyproject.toml, read from the installed metadata
    __version__ = _metadata.version("hearth-gateway")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["__version__"]
