"""Classification heads: margin losses, the BroadFace queue and the head over a class partition."""
from broadface.heads.adaptive import AdaFace, CurricularFace, MagFace
from broadface.heads.broadface import BroadFace, HeadStats, QueueDiagnostics, merge_head_states
from broadface.heads.margins import (ArcFace, CombinedMargin, CosFace, MarginHead, NormSoftmax, SubCenterArcFace,
                                     check_labels)
from broadface.heads.partition import ClassPartition, class_range
from broadface.heads.queue import EmbeddingQueue, QueueEntries
from broadface.heads.union import chunked_margin_ce


def ShardedBroadFace(margin, num_classes: int, embedding_size: int, queue_size: int = 8192, **kwargs) -> BroadFace:
    """BroadFace over a class-sharded classifier: :meth:`BroadFace.sharded` (kept for its familiar name)."""
    return BroadFace.sharded(margin, num_classes, embedding_size, queue_size, **kwargs)


def ShardedMarginHead(margin, num_classes: int, embedding_size: int, **kwargs) -> BroadFace:
    """Partial FC: the class-sharded margin loss without a queue (``BroadFace.sharded(..., queue_size=0)``)."""
    return BroadFace.sharded(margin, num_classes, embedding_size, 0, **kwargs)


__all__ = ["AdaFace", "ArcFace", "BroadFace", "ClassPartition", "CombinedMargin", "CosFace", "CurricularFace",
           "EmbeddingQueue", "HeadStats", "MagFace", "MarginHead", "NormSoftmax", "QueueDiagnostics", "QueueEntries",
           "ShardedBroadFace", "ShardedMarginHead", "SubCenterArcFace", "check_labels", "chunked_margin_ce",
           "class_range", "merge_head_states"]
