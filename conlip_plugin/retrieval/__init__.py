"""Dense retrieval with any open_clip model: embed a gallery once (``index``), query it (``search``),
and serve a search page over a JSON API (``serve``); the ``conlip-retrieval`` command.

Modules: ``sources`` (folders, CSVs and webdataset shards as gallery items), ``encoder`` (the model,
its identity and its preprocessing), ``store`` (the resumable on-disk index), ``nearest`` (exact and
faiss search, and the approximate index's recall), ``server`` (the web page and API), ``extras``
(the optional packages, imported with an install hint), ``cli``, ``benchmark``.
"""
