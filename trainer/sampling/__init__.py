"""Generation with a KV cache (greedy, temperature, top-k, top-p), jitted with bucketed shapes."""

from posttrain.trainer.sampling.sampler import (
    Generation,
    bucket,
    filter_top_k,
    filter_top_p,
    generate,
    sample_token,
)

__all__ = ["Generation", "bucket", "filter_top_k", "filter_top_p", "generate", "sample_token"]
