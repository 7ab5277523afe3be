"""Training data: reading rows (JSONL/Parquet, local or gs://) and turning them into fixed-shape batches."""
