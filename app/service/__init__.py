"""The REST inference service: a thin FastAPI layer over the PatchCore engine in app.core."""
