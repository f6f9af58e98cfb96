"""Celery tasks: thin shells (name, queue, retry policy) around core functions in `domain/`."""

from __future__ import annotations
