FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY gateway gateway
COPY compute compute
RUN pip install --no-cache-dir . && useradd --system --no-create-home timebox
USER timebox
EXPOSE 8000
CMD ["timebox-gateway", "--host", "0.0.0.0", "--port", "8000"]
