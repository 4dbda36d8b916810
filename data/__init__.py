"""Text corpora and the shapes world (TFDS, no TensorFlow), the BPE tokenizer and grain input pipelines."""
