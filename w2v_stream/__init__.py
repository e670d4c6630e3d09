"""w2v_stream: pre-train Wav2Vec2 from streamed WebDataset tar shards with fixed-shape batches."""

__version__ = "0.1.0"
