"""StreamingLLM: the sink + rolling-window KV-cache policy and a streaming perplexity evaluation."""

from attnlab.streaming.cache import KVCache, StreamingPolicy, insert, rope_positions
from attnlab.streaming.eval import stream_logits, streaming_perplexity, token_nll, write_streaming_report

__all__ = ["KVCache", "StreamingPolicy", "insert", "rope_positions", "stream_logits", "streaming_perplexity",
           "token_nll", "write_streaming_report"]
