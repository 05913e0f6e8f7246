"""Placeholder HTTP app: only /health until the API lands."""
from flask import Flask


def create_app():
    app = Flask(__name__)
    app.get("/health")(lambda: {"status": "ok"})
    return app


def main():
    create_app().run(host="127.0.0.1", port=8080)
