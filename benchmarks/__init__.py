"""Benchmarks of DS01Spawner against plain DockerSpawner: `benchmarks/run [--quick]`.

Everything runs on this machine with real parts: an in-process JupyterHub
(MockHub, as the integration tests start it), configurable-http-proxy and the
Docker engine. Results go to benchmarks/results/latest.json.
"""
