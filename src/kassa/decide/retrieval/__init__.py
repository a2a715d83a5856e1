"""Product retrieval for cross-sells: the signals an order stream leaves (co-purchase neighbours, each buyer's
repeat purchases, popularity), the candidates they retrieve for an order, and how those candidates are scored
and described to the learner.

* `retriever`: `ProductRetriever`, the in-memory state fed by orders (write path) and read on the decision
  hot path (`retrieve`, `retrieve_scored`).
* `signals`: the merged retrieval score and the ``|r`` learner namespace of a candidate.
* ``python -m kassa.decide.retrieval``: manual timing (`__main__`).
"""

from kassa.decide.retrieval.retriever import SOURCES, ProductRetriever, product_key

__all__ = ["SOURCES", "ProductRetriever", "product_key"]
