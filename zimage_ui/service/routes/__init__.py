"""The service's routes, one ``APIRouter`` per concern; ``service.app.create_app`` includes them in this order.

Each module has ``router(ctx: ServiceContext, r=None) -> APIRouter`` (its routes on ``r``, the app's router, or a
new one): ``health`` (/healthz, /readyz, /metrics), ``api``
(/api/v1/vram, presets, info, generate) and ``history`` (/api/v1/history...).
"""
