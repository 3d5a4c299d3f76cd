"""The local image server: `flowflash serve` (serve.py), its model worker (jobs.py), HTTP APIs (server.py)
and the page (static/)."""
