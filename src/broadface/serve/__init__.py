"""The face-search service behind ``broadface serve`` (docs/serving.md).

``model`` (the one place a model is loaded and images are embedded), ``faces`` (uploads to aligned
crops), ``index`` (exact / faiss search over identity templates), ``store`` (the SQLite gallery),
``gallery`` (store + in-memory index in step), ``service`` (the operations, without HTTP), ``app``
(the FastAPI routes and the page), ``server`` (uvicorn).
"""
