"""zimage-ui: a browser front end and service for Z-Image-Turbo.

Layout: ``validation`` (every request is checked here), ``engine`` (queued and run), ``memory`` (measured),
``ui`` / ``service`` / ``cli`` (the three doors, rendered), ``models`` (where weights come from).
"""

__version__ = "0.1.0"
