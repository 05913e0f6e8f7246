"""What a worker's views share: the settings, the models, the queue and the stores, kept on the Flask app."""
from __future__ import annotations

from flask import current_app

from .a1111 import FileHashes, OptionsStore
from .params import Limits
from .security import Credentials
from .storage import ImageStore


class State:
    def __init__(self, settings, models, queue):
        self.settings = settings
        self.models = models
        self.queue = queue
        self.store = ImageStore(settings.data_dir, ttl=settings.file_ttl)
        self.options = OptionsStore(settings.data_dir)
        self.hashes = FileHashes(settings.data_dir)
        self.limits = Limits.from_settings(settings)
        self.cors_origins = settings.cors_origin_list()
        self.credentials = Credentials(settings.api_key, settings.api_auth_pairs())


def state() -> State:
    return current_app.extensions["sd_api_server"]
