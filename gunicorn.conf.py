"""gunicorn settings for ``gunicorn -c gunicorn.conf.py wsgi:app``: the server's own settings, read from
the environment (``SD_*``, see docs/operating.md), translated by ``api.serve.gunicorn_settings``."""
from api.config import Settings
from api.serve import gunicorn_settings

for _name, _value in gunicorn_settings(Settings.from_env()).items():
    if _value is not None:
        globals()[_name] = _value
