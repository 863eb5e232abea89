"""The job's stage code, reading ``params.yaml`` and files: the DVC stages (``stages``), SlimSet curation
(``curate``, ``prompt_pool``), evaluation (``evaluate``), the report (``report``) and the memory prediction
(``memory``).
"""
