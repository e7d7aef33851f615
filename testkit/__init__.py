"""What the tests and the benchmarks share, kept out of the installed packages because the
daemon and the SDK never use it:

- net.py: free loopback ports, waiting for one to listen
- wait.py: ``wait_until`` a condition holds
- procs.py: starting and stopping child processes, reading /proc
- examples.py: the repository's root and the example modules (built on demand)
- mosquitto.py: ``Mosquitto``, a broker on a free loopback port
- gateway.py: ``GatewayProcess``, a real ``hearth-gateway run`` daemon

It is not installed: pytest puts the repository root on ``sys.path`` (pyproject.toml's
``pythonpath``), the benchmarks insert it themselves (benchmarks/_common.py). Importing
``testkit`` imports nothing else.
"""
