"""Each algorithm's settings: one pydantic type per ``spec.<block>``, holding its real defaults.

A module per algorithm; ``rl.py`` holds what the RL algorithms share (sampling, rewards, the SFT
warm-up) as one base type. ``posttrain/api/algorithms.py`` registers each type under its
``spec.algorithm`` name. Imports neither JAX nor kopf.
"""
