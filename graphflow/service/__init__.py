"""`graphflow serve`: a durable job queue, workers with warm engines, and an HTTP API (FastAPI, optional extra).

The queue, results store and worker import neither FastAPI nor torch at import time; `graphflow.service.app`
needs the `serve` extra (`pip install "graphflow[serve]"`).
"""
