"""Stage-1 RAG: the per-anatomy sentence database and retrieval from it."""
