"""Docker containers with labels, ledger rows and reaping; data snapshots; safe tar archives.

Importing this package does not import the docker SDK: ``engine`` imports it when an
:class:`~pytest_sandbox.containers.engine.Engine` first connects.
"""
