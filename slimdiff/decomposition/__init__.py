"""Decomposition: the closed-form math (``closed_form``: covariances and weights in, narrower weights out), a
group's statistics and factorisation (``groups``), the factorisations scoring records for reuse
(``factorisations``) and applying a plan to a model (``apply``).
"""
