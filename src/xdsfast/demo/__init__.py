"""``xdsfast demo``: an istiod stand-in, xdsfast and a real Envoy end to end (:mod:`.run`).

The peers it runs live in :mod:`xdsfast.peers`, shared with the tests and benchmarks.
"""
