"""The PatchCore algorithm: pure torch / numpy / faiss, no web imports."""
