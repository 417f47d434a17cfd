"""Routing Transformer attention (Roy et al., TACL 2021): online k-means routing, clustered attention with a
balanced (reference, non-causal) or nearest-centroid (causal) rule, and blocked local attention."""

from attnlab.attention.routing.clustered import (ROUTINGS, balanced_assignment, balanced_attention,
                                                  nearest_attention, routing_weights)
from attnlab.attention.routing.kmeans import (centroid_scores, commitment_loss, kmeans_ema_update, layer_norm,
                                              nearest_centroid)
from attnlab.attention.routing.local import local_attention, local_mask

__all__ = ["ROUTINGS", "balanced_assignment", "balanced_attention", "centroid_scores", "commitment_loss",
           "kmeans_ema_update", "layer_norm", "local_attention", "local_mask", "nearest_attention",
           "nearest_centroid", "routing_weights"]
