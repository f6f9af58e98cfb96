# Production image: the `doorstroom` CLI on Python 3.11 with the locked runtime dependencies.
# compose.yaml runs the same image as migrate, api, worker and beat with different commands.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

RUN pip install --no-cache-dir uv

WORKDIR /app

# Dependencies first, from the lock alone: this layer is rebuilt only when they change.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the project itself, installed editable so that var/ resolves to /app/var.
COPY . .
RUN uv sync --frozen --no-dev

# Run unprivileged; var/ is the only place the app may write (SQLite file, local state).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin doorstroom \
    && mkdir -p /app/var && chown doorstroom:doorstroom /app/var
USER doorstroom

ENV PATH=/app/.venv/bin:$PATH
EXPOSE 8000
CMD ["doorstroom", "api", "--host", "0.0.0.0", "--port", "8000"]
