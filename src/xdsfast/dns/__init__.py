"""The local DNS proxy: answers mesh names from istiod's NameTable, forwards the rest.

- :mod:`.proxy`: the proxy assembled from the configuration, as Istio's agent sets it up.
- :mod:`.server`: the UDP and TCP listeners on each address.
- :mod:`.handler`: what the proxy does with one query, whatever transport carried it.
- :mod:`.table`: the latest NameTable and the compiled name table answered from.
- :mod:`.wiretable`: a NameTable kept as istiod's wire bytes, read an entry at a time.
- :mod:`.names`: Istio's rules for the names a NameTable answers to.
- :mod:`.wire`: DNS wire-format pieces handled as raw bytes (names, headers, truncation).
- :mod:`.forward`: queries the table does not answer, sent to the upstream resolvers.
- :mod:`.resolvconf`: those resolvers and the search list, as Istio's agent reads them.
- :mod:`.metrics`: the proxy's metrics under Istio's names.

The package itself imports nothing; the agent imports :mod:`.proxy` (and with it the
listeners and dnslib) only with DNS on.
"""
