"""Asynchronous, disaggregated RL (``spec.rollout.mode: async``): rollout workers sample while the
trainer trains, at most ``maxPolicyLag`` policy versions apart.

    rollout worker (worker.py)                         trainer, process 0 (service.py)
    ------------------------------                     ----------------------------------------
    GET /v1/assign   -> rollout index i  ------------> the next index of this worker's share
    GET /v1/weights  <- newest version (safetensors) - published after every optimizer step
    sample + score i with the newest weights it holds
    POST /v1/trajectories  (i, version) -----------> queued; the batch source takes index i at
                                                       its first step t_i if t_i - version <= lag

The schedule (which index, which version it needs) is pure (``schedule.py``), the bytes on the
wire too (``wire.py``): weights as one safetensors blob checked by length and SHA-256 before a
worker swaps it in whole, so a worker never samples from a mix of two versions.
"""
