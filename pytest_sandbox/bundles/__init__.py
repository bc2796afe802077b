"""Bundle server and puller: versioned bundles per tenant, faults on demand, atomic install.

Import the pieces from their modules (``pytest_sandbox.bundles.server`` …); this package
imports nothing heavy at import time.
"""
