"""gunicorn entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Settings come from environment variables (``SD_MODEL``, ``SD_DATA_DIR``, ``API_KEY``, ... see
``api/config.py``). With ``preload_app = False`` this module is imported in each worker after the
fork, so every worker loads its own copy of the model.
"""
from app import create_app

app = create_app()
