"""Planning: widths that meet a budget in parameters, MACs or measured latency (``allocation``), and the latency
tables a latency budget reads (``latency``).
"""
