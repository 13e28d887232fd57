# Image of the fashion-gan training job: `docker run IMAGE <hydra overrides>` runs `python train.py`.
#
# Build from PyPI:              docker build -t fashion-gan:latest .
# Build with no network:        scripts/build-wheelhouse.sh   (once, on a machine with PyPI access)
#                               docker build --build-arg WHEELHOUSE=1 -t fashion-gan:latest .
# Build on the local base image: scripts/build-base-image.sh
#                               docker build --build-arg BASE_IMAGE=fashion-gan-base:bookworm ...
#
# Any base with CPython 3.11 as `python3` and the venv module works. Never pass a secret as a
# build argument: build arguments are stored in the image metadata. Jobs get credentials from the
# environment at run time.

ARG BASE_IMAGE=python:3.11-slim

# Stage 1: install the pinned dependencies into /opt/venv. The final image copies only the venv,
# so the wheelhouse never becomes a layer of it.
FROM ${BASE_IMAGE} AS dependencies

# 1 installs from the wheels in .cache/wheelhouse of the build context with no network access;
# 0 installs from the package index.
ARG WHEELHOUSE=0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only the dependency list and the wheels are copied here, so a change to the code leaves this
# stage cached. The `[e]` pattern lets the build go on when the context has no wheelhouse,
# because a COPY whose only source is missing fails.
COPY pyproject.toml .cache/wheelhous[e] /tmp/dependencies/

# [project].dependencies of pyproject.toml pins every direct dependency with `==`.
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/dependencies/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && if [ "$WHEELHOUSE" = 1 ]; then \
        if ! ls /tmp/dependencies/*.whl >/dev/null 2>&1; then \
            echo "WHEELHOUSE=1 but the build context has no .cache/wheelhouse/*.whl; run scripts/build-wheelhouse.sh first" >&2; \
            exit 1; \
        fi; \
        pip install --no-index --find-links /tmp/dependencies --requirement /tmp/requirements.txt; \
    else \
        pip install --requirement /tmp/requirements.txt; \
    fi \
    && pip check

# Stage 2: the runtime image.
FROM ${BASE_IMAGE}

# The job runs as this user, not as root. Give the UID of the host user who owns bind-mounted
# output folders if that matters (--build-arg APP_UID=$(id -u)).
ARG APP_UID=1000
RUN useradd --create-home --uid "$APP_UID" --shell /bin/bash app \
    && install -d -o app -g app /app

COPY --from=dependencies /opt/venv /opt/venv

# PYTHONPATH makes the package importable from any working directory without installing it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8

WORKDIR /app
# The code comes last, so editing it rebuilds only these layers. It stays owned by root, so the
# job cannot change it; the job writes its outputs under /app (owned by the app user) or storage.
COPY pyproject.toml train.py /app/
COPY conf/ /app/conf/
COPY fashion_gan/ /app/fashion_gan/

USER app
# docker stop sends SIGTERM: train.py then saves and uploads a checkpoint and exits with 75.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "train.py"]
