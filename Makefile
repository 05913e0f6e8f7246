# The two commands of the README. Both work on a fresh clone: scripts/setup creates .venv,
# installs what is needed and generates the embedded default model.
.PHONY: serve test

serve:
	./scripts/setup
	.venv/bin/sd-api-server

test:
	./scripts/setup --test
	.venv/bin/python -m flake8
	.venv/bin/python -m pytest
