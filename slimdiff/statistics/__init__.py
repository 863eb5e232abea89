"""Statistics: the capture of activation second moments (method.md §2): Gram kernels (``gram``), the sums and
their file (``sums``), the recording hooks (``recorder``), the capture loop (``recording``) and its shards.
"""
