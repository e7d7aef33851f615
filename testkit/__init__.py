"""What the tests, the benchmarks and the examples share, kept out of the installed packages
because the daemon and the SDK never use it:

- net.py: free loopback ports, waiting for one to listen
- wait.py: ``wait_until`` a condition holds
- procs.py: starting and stopping child processes, reading /proc
- examples.py: the repository's root and the example modules (built on demand)
- mosquitto.py: ``Mosquitto``, a broker on a free loopback port
- gateway.py: ``GatewayProcess``, a real ``hearth-gateway run`` daemon
- scenes.py, plates_synth.py: synthetic camera sequences and licence-plate scenes

It is not installed: pytest puts the repository root on ``sys.path`` (pyproject.toml's
``pythonpath``), the benchmarks (benchmarks/_common.py) and examples insert it themselves.
Importing ``testkit`` imports nothing else, so an example that only renders scenes does not
load the gateway.
"""
