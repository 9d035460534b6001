"""Prefect flows around the iterabre library: `compress` (the IteRABRe loop) and `watch`.

Flows own orchestration (caching, retries, artifacts) and lineage (MLflow); the algorithm
pieces they call live in `iterabre.steps` and never import Prefect or MLflow.
"""
