FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sdk sdk
COPY runtime runtime
RUN pip install --no-cache-dir .
COPY load_tests load_tests
ENV PYTHONPATH=/app
ENTRYPOINT ["rillflow"]
