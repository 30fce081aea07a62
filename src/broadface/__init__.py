"""broadface: BroadFace training for face recognition and deep metric learning.

>>> from broadface import ArcFace, BroadFace
>>> head = BroadFace(ArcFace(num_classes=1000, embedding_size=512), queue_size=8192)
>>> loss = head(embeddings, labels)   # encoder: ∇L(X); classifier: ∇L(X ∪ queue)
"""
from broadface.heads import ArcFace, BroadFace, CombinedMargin, CosFace, EmbeddingQueue, MarginHead, NormSoftmax

__version__ = "0.1.0"
__all__ = ["ArcFace", "BroadFace", "CombinedMargin", "CosFace", "EmbeddingQueue", "MarginHead", "NormSoftmax",
           "__version__"]
