"""Methods that use a model's intermediate layers."""
from leanformer.layers.elastic_embeddings import ElasticEncoder, elastic_embedding
from leanformer.layers.matryoshka_2d import matryoshka_2d_loss, train_2dmse

__all__ = ["ElasticEncoder", "elastic_embedding", "matryoshka_2d_loss", "train_2dmse"]
