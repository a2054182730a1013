"""The ``cxr`` command line: local model commands, the admin API client, the local training run.

A client of the rest: it imports :mod:`ml` for local work and talks to a running service over
HTTP only. :mod:`cli.main` is the ``cxr`` entry point.
"""
