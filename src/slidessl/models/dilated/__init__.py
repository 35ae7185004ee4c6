"""LongNet dilated attention (Ding et al., 2023, arXiv:2307.02486), in pieces:

- ``plan``: the rows every branch keeps, as cached index tensors (:class:`plan.Plan`).
- ``kernels``: the private fused kernels that return the log-sum-exp, and the switches
  (backend, LSE-gradient mode, private kernels on/off) in one place.
- ``lse``: attention with its log-sum-exp and exact gradients through both (the autograd
  function, the surrogate term, the public-API fallback).
- ``packed``: every branch of a plan in one autograd function, combined by LSE.

``slidessl.models.attention`` is the thin module the blocks call.
"""
