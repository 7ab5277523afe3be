"""Completions that reach maxNewTokens, as pure functions on host arrays (DAPO section 3.4).

- ``truncated``: a completion that never produced EOS was cut at maxNewTokens.
- ``soft_overlong_penalty``: DAPO's "soft overlong punishment" (section 3.4), with L_max = maxNewTokens
  and L_cache = buffer, scaled by penaltyFactor as in verl:

      R_length(y) = 0                                  if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                  = -1                                 if L_max < |y|

  |y| counts the completion's tokens with its EOS (verl's valid response length). The sampler
  never goes past L_max, so the last case cannot occur here; the clip keeps it true anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def truncated(
    completion_ids_rn: np.ndarray, completion_mask_rn: np.ndarray, eos_id: int | Sequence[int]
) -> np.ndarray:
    """[R] bool: the completion has none of the EOS ids among its tokens (cut at maxNewTokens)."""
    is_eos = np.isin(completion_ids_rn, np.atleast_1d(np.asarray(eos_id)))
    has_eos = (is_eos & (completion_mask_rn > 0)).any(axis=1)
    return np.asarray(~has_eos)


def soft_overlong_penalty(
    lengths_r: np.ndarray, max_new_tokens: int, buffer: int, factor: float = 1.0
) -> np.ndarray:
    """[R] float32 reward <= 0: linear from 0 at L_max - buffer tokens to -factor at L_max."""
    expected = max_new_tokens - buffer
    excess = np.asarray(lengths_r, np.float64) - expected
    return (-np.clip(excess / buffer, 0.0, 1.0) * factor).astype(np.float32)
