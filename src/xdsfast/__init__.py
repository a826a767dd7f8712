"""xdsfast: a fast drop-in replacement for the xDS proxy of Istio's sidecar agent."""

__version__ = "0.1.0"
