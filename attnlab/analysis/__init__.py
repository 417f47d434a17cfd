"""Attention-sink analysis: metrics from a forward pass with internals, and the sink report."""

from attnlab.analysis.metrics import (Columns, activation_metrics, chunked_logsumexp, columns_from_weights,
                                      importance, layer_metrics, model_metrics, softmax_columns_from_lse, summarize)
from attnlab.analysis.report import history_record, load_history, write_sink_report

__all__ = ["Columns", "activation_metrics", "chunked_logsumexp", "columns_from_weights", "history_record",
           "importance", "layer_metrics", "load_history", "model_metrics", "softmax_columns_from_lse", "summarize",
           "write_sink_report"]
