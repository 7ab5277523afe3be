"""Tasks the project ships: generated data, a tokenizer to match, and a way to score answers."""
