# Two images from one file, both installed from pyproject.toml exactly as CI installs it:
#   docker build --target web    -t cxr-web .                          (base dependencies, no TensorFlow)
#   docker build --target worker -t cxr-worker .                       (TF_EXTRA=cpu, as the Makefile)
#   docker build --target worker --build-arg TF_EXTRA=gpu -t cxr-worker:gpu .
# Usually built through docker-compose.yml (and docker-compose.gpu.yml for the GPU worker).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Fixed uid/gid so files in named volumes keep one owner across rebuilds; USER uses the number
# so runtimes can verify it is not root.
# /models is the mount point of the shared `models` volume in both images: Docker copies the
# ownership of the first container's mount point into a new, empty named volume, so whichever
# service starts first, the volume ends up writable by cxr.
RUN groupadd --system --gid 10001 cxr \
    && useradd --system --uid 10001 --gid cxr --create-home --home-dir /home/cxr \
       --shell /usr/sbin/nologin cxr \
    && mkdir -p /models \
    && chown cxr:cxr /models
WORKDIR /app
# Dependencies are installed from pyproject.toml with empty stand-in packages first, so editing
# the source reuses the (large, for TensorFlow) dependency layer; the real source follows.
COPY pyproject.toml README.md* ./


FROM base AS web
RUN mkdir -p web worker ml cli \
    && touch web/__init__.py worker/__init__.py ml/__init__.py cli/__init__.py \
    && pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info web worker ml cli
COPY web/ web/
COPY worker/ worker/
COPY ml/ ml/
COPY cli/ cli/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info
USER 10001:10001
EXPOSE 8000
CMD ["gunicorn", "--config", "python:web.gunicorn_conf", "--bind", "0.0.0.0:8000", "web:create_app()"]


FROM base AS worker
# Which TensorFlow extra of pyproject.toml to install: cpu (the Makefile's, the default) or gpu.
ARG TF_EXTRA=cpu
ENV TF_CPP_MIN_LOG_LEVEL=1 \
    KERAS_HOME=/opt/keras \
    CXR_MODEL_DIR=/models
# "./[extra]" is pip's ".[extra]"; hadolint (DL3013) reads the latter as an unpinned package name.
RUN mkdir -p web worker ml cli \
    && touch web/__init__.py worker/__init__.py ml/__init__.py cli/__init__.py \
    && pip install --no-cache-dir "./[${TF_EXTRA}]" \
    && rm -rf build ./*.egg-info web worker ml cli
# KERAS_HOME must be writable by the runtime user: Keras falls back to /tmp/.keras (and so would
# download again) when it is not.
RUN mkdir -p /opt/keras \
    && chown cxr:cxr /opt/keras
# Fetch the ImageNet VGG16 weights now, as the runtime user, so containers start offline.
USER 10001:10001
RUN python -c "import keras; keras.applications.VGG16(include_top=False, weights='imagenet')"
# Back to root (uid 0) to install the source into site-packages.
USER 0
COPY web/ web/
COPY worker/ worker/
COPY ml/ ml/
COPY cli/ cli/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info
USER 10001:10001
CMD ["celery", "--app", "worker.celery_app", "worker", "--queues", "inference", "--pool", "threads", "--concurrency", "16", "--hostname", "inference@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
