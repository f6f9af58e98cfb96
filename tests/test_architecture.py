"""`domain/` holds the business and imports no web, task-queue, HTTP or mail framework."""

from __future__ import annotations

import ast
from pathlib import Path

DOMAIN = Path(__file__).resolve().parent.parent / "domain"
FORBIDDEN = {"fastapi", "starlette", "celery", "kombu", "httpx", "requests", "aiohttp",
             "urllib3", "smtplib", "aiosmtplib", "email.mime", "uvicorn", "api", "workers",
             "cli"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_domain_imports_no_framework():
    offenders = []
    for path in sorted(DOMAIN.rglob("*.py")):
        for module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(f"{path.relative_to(DOMAIN.parent)} imports {module}")
    assert offenders == []


def test_the_check_itself_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import celery\nfrom fastapi import FastAPI\n")
    assert {"celery", "fastapi"} <= imported_modules(sample)
