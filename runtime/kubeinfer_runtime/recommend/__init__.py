"""Inference Recommender: open-loop load generator and candidate search.

One concept per module: ``stats`` (quantiles with confidence intervals from an
HDR histogram), ``loadgen`` (open-loop Poisson arrivals over a minimal HTTP/1.1
client), ``pricing`` (instance type and cost), ``search`` (stepped rates and
successive halving over an injected measuring function), ``servers`` (local
candidate processes, probing and CPU/memory sampling), ``report`` (table, JSON,
HTML), ``main`` (``kubeinfer-runtime recommend``). Contract:
``kubeinfer_runtime.contract.recommend``.
"""
