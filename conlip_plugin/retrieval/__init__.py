"""Dense retrieval with any open_clip model: embed a gallery once (``index``), query it (``search``),
and serve a search page over a JSON API (``serve``); the ``conlip-retrieval`` command.

Modules: ``sources`` (folders, CSVs and webdataset shards as gallery items), ``encoder`` (the model,
its identity and its preprocessing), ``embedding`` (a chunk of items to its vectors), ``store`` (the
resumable on-disk index), ``metadata`` (the items' records as a memory-mapped Arrow file),
``arrays`` (vector files written and read a block at a time), ``nearest`` (exact and faiss search,
and the approximate index's recall), ``sizing`` (which faiss index fits the memory budget),
``distributed`` (ranks sharing an index run), ``server`` (the app and its socket), ``routes`` (the
page and our API), ``request_checks`` (what a request may ask), ``clip_retrieval_api``, ``limits``,
``server_logs``, ``extras`` (the optional packages, imported with an install hint), ``cli``, and
``benchmark`` (the former path of ``conlip_plugin.benchmarks.retrieval``, whose modules measure all this).
"""
