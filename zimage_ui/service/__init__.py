"""The service door: a FastAPI app (REST API, health, metrics, history) that the web UI mounts onto.

``app.create_app(settings, engine)`` builds the app; ``server.serve(settings)`` runs it under uvicorn with the
engine, signal handling and the watchdog. ``healthcheck`` is the supervisor event listener. Nothing here runs at
import time.
"""
