"""posttrain.trainer: the trainer image's code (models, sampling, algorithms, loop, entrypoint)."""
