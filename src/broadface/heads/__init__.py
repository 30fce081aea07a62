"""Classification heads: margin losses and the BroadFace queue."""
from broadface.heads.broadface import BroadFace
from broadface.heads.margins import ArcFace, CombinedMargin, CosFace, MarginHead, NormSoftmax, check_labels
from broadface.heads.queue import EmbeddingQueue
from broadface.heads.sharded import ShardedBroadFace, ShardedMarginHead
from broadface.heads.union import chunked_margin_ce

__all__ = ["ArcFace", "BroadFace", "CombinedMargin", "CosFace", "EmbeddingQueue", "MarginHead", "NormSoftmax",
           "ShardedBroadFace", "ShardedMarginHead", "check_labels", "chunked_margin_ce"]
