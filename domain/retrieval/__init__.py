"""Hybrid retrieval over code-review knowledge: chunking, embeddings, a FAISS dense index, a BM25 keyword
index, rank fusion, versioned on-disk snapshots, and the ``index`` job handler (see docs/retrieval.md).

Readers call ``domain.retrieval.service.retrieve_context``; writers run ``handle_index`` as an index job.
"""
