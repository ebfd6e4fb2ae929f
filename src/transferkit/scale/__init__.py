"""Scale-out on a Ray cluster (``pip install 'transferkit[ray]'``): batch prediction of a large collection and the
feature extraction of training, the two embarrassingly parallel parts of transferkit's work.

Nothing here is imported unless ``--ray`` is given: a user without Ray sees no change. transferkit writes no
scheduler: the work is a Ray Dataset (``ray.data``) of file paths mapped by an actor pool that loads the model
once per actor, and Ray's own fault tolerance (task retries, actor restarts) recovers a worker killed mid-job.

- :mod:`transferkit.scale.cluster`: connect to a cluster, or start a local one with this machine's cores.
- :mod:`transferkit.scale.predict`: ``predict --ray --out preds.parquet``, resumable.
- :mod:`transferkit.scale.features`: ``train --ray``: the missing feature-cache entries computed on the cluster.
"""
