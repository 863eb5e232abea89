"""The runtime a compressed model needs, and nothing of the compressor: the slim attention processors
(``attention``), the factorised layer (``layers``), rebuilding a narrower structure (``resize``), the saved folder
(``folder``: save, load, describe) and the sampler settings (``sampling``). The MLflow model ships this package.

Importing it imports no module of ``slimdiff.statistics``, ``scoring``, ``planning`` or ``decomposition``
(tests/test_layout.py).
"""
