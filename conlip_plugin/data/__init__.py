"""Data tools for ConLIP: clip_benchmark's offline retrieval layouts, webdataset shards, the emoji pairs.

``files`` holds the small helpers the others share, ``karpathy`` the evaluation layouts written from
Karpathy's split JSON, ``shards`` the training shards and subsets, ``prepare`` the ``conlip-prepare``
command over both, and ``emoji`` the ``conlip-emoji`` command that builds real pairs from npm packages.
"""
