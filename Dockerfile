# coserve: CPU image by default. For a CUDA image pass a CUDA base and a torch build for it:
#   docker build --build-arg BASE_IMAGE=<a CUDA runtime image with Python 3.11> \
#                --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX_URL=<your torch index> .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

RUN useradd --create-home --uid 10001 coserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY coserve ./coserve
# torch first (the same order as `make serve`), then the project.
RUN pip install ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} "${TORCH_SPEC}" \
 && pip install .

RUN mkdir -p /data /models && chown coserve:coserve /data /models
USER coserve
ENV COSERVE_HOST=0.0.0.0 COSERVE_PORT=8000 COSERVE_DATA_DIR=/data
VOLUME ["/data", "/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["coserve", "serve"]
