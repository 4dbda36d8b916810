"""Text corpora (TFDS, no TensorFlow), the BPE tokenizer and grain input pipelines."""
