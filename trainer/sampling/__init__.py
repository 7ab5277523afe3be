"""Generation with a KV cache (greedy, temperature, top-k, top-p), jitted with bucketed shapes,
data-parallel over a mesh's batch axes and optionally in chunks of rows."""

from posttrain.trainer.sampling.sampler import (
    Generation,
    bucket,
    filter_top_k,
    filter_top_p,
    generate,
    lower_generate,
    sample_token,
    sample_token_and_logprobs,
    stop_token_ids,
)

__all__ = [
    "Generation",
    "bucket",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "lower_generate",
    "sample_token",
    "sample_token_and_logprobs",
    "stop_token_ids",
]
