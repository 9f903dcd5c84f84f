"""Node mode: one broker per node serving every task pod of the node (see docs/node-mode.md).

Each request carries the calling pod's projected service-account token (``verify``); the pod's service
account selects an identity partition (``partitions``) with its own logins and cache, built from the
backend templates plus that identity's overrides (``config``); ``server`` is the edge that ties the two.
"""
