"""Tensor parallelism: N ranks, one process each, each holding 1/N of the weights and of the KV cache.

`group.py` is the process group the model and the engine are handed (None everywhere means one rank);
`launch.py` starts the ranks (spawned by kvx, or under torchrun) and turns a rank's failure into one line;
`selection.py` makes a compression's choice exact across ranks (the statistics gathered once, the policy run
on every rank identically, each rank keeping its own heads).
"""
