"""The commands researchers type in a JupyterLab terminal: image-update, image-list,
project list|init|launch, container retire, check-limits.

Thin clients of the ds01 service's JSON API (``api/`` under its prefix): every
rule and every refusal is the service's, printed as it says it. They run
inside the user's container with its Python and nothing else, so this package
imports the standard library and itself only (tests/test_cli.py checks it);
images/build copies it into the base image as ``ds01_cli``.
"""
