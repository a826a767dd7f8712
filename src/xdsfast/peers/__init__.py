"""Real xDS peers, for the demo, the tests and the benchmarks alike.

- :mod:`.controlplane`: an istiod stand-in (ADS server, SotW and delta).
- :mod:`.mesh`: sample Envoy resources (listener, route, cluster, endpoints, NameTable).
- :mod:`.envoy`: launches a real Envoy sidecar pointed at an ADS address.
- :mod:`.adsclient`: a scripted ADS client, for tests and Envoy-less demos.
- :mod:`.backend`: a tiny HTTP/1.1 backend and an HTTP GET helper.
- :mod:`.pki`: a throw-away CA and certificates (``cryptography``: test, bench extras).

They are package code (not test helpers) because ``xdsfast demo`` runs them too;
they need the ``demo`` extra (Envoy's protos), which the agent itself never imports.
"""
