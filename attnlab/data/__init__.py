"""Input pipeline: tokenizers, text sources, the embedded corpus, synthetic tasks, packing and batching."""

from attnlab.data.bigram_backcopy import BigramBackcopyConfig
from attnlab.data.corpus import embedded_documents
from attnlab.data.packing import Packer, pack_documents, rows_to_batch, segment_positions
from attnlab.data.pipeline import DataConfig, make_dataset
from attnlab.data.special_tokens import LandmarkTokens, MetaTokens
from attnlab.data.synthetic import MQARConfig, PasskeyConfig, register_task, task_config_classes
from attnlab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = ["BOS_ID", "BigramBackcopyConfig", "ByteTokenizer", "DataConfig", "EOS_ID", "HFTokenizer", "LandmarkTokens",
           "MQARConfig", "MetaTokens", "PAD_ID", "Packer", "PasskeyConfig", "embedded_documents", "make_dataset",
           "make_tokenizer", "pack_documents", "register_task", "rows_to_batch", "segment_positions",
           "task_config_classes"]
