"""Scale-out on Ray Serve: one ``Engine`` per replica (one GPU each, or a share of the CPUs), behind ``EngineAPI``.

* ``replica.py``: the Serve deployment (``ZImageReplica``): one engine, its health check, its routing stats, a
  streaming ``run`` that mirrors the job's progress; ``build_app`` and ``app_builder`` (for Serve config files).
* ``routing.py``: the request router: a ready replica predicted to fit, the fewest ongoing requests among them.
* ``board.py``: the board, a small Ray actor every replica reports to (state, memory, queue); the door reads all
  replicas from it in one call.
* ``client.py``: ``RemoteEngine``, the door's engine: implements ``EngineAPI`` over a ``DeploymentHandle``, mirrors
  each remote job into a local ``Job`` (progress, cancel), keeps jobs-per-client across replicas.
* ``local.py``: ``zimage-ui serve --replicas N`` (a local Ray instance) and ``--ray-address`` (a cluster).

Ray is an optional extra (``pip install zimage-ui[ray]``); nothing in this package is imported unless scale-out is
asked for, and nothing here runs at import time.
"""
