"""What the hidden states and embeddings encode: linear probes and embedding geometry."""
