"""Scoring (method.md §4): what each module's width costs in error (``influence``), and how much an error at its
output matters downstream (``gains``, ``gain_shards``).
"""
