FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY runtime runtime
COPY gateway gateway
COPY compute compute
COPY timebox timebox
COPY timebox_client timebox_client
RUN pip install --no-cache-dir '.[otel]' && useradd --system --no-create-home timebox
# your own task modules go here too (COPY them, or install them with pip); the demo's:
COPY examples examples
ENV TIMEBOX_TASK_MODULES=examples.tasks
USER timebox
EXPOSE 8000
CMD ["timebox-gateway", "--host", "0.0.0.0", "--port", "8000"]
