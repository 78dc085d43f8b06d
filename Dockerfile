# Stoker in a container; `stoker` is the entrypoint. One Dockerfile, three variants by build argument
# ACCELERATOR, which picks the extra of pyproject.toml that is installed:
#   docker build -t stoker:cpu .                                  # plain: CPU (laptops, CI)
#   docker build --build-arg ACCELERATOR=tpu -t stoker:tpu .      # .[tpu]: jax[tpu] with libtpu (Cloud TPU VMs, GKE)
#   docker build --build-arg ACCELERATOR=cuda -t stoker:cuda .    # .[cuda]: jax[cuda13] with CUDA from pip (the
#                                                                 #   host supplies only the NVIDIA driver)
#   docker run --rm stoker:cpu quickstart
#   docker run --rm stoker:tpu train --gin_file configs/model/llama3_8b.gin --workdir gs://BUCKET/runs/x
# `stoker k8s train|serve --image IMAGE` renders the Kubernetes manifests that run it (README, "Deployment").

ARG PYTHON_VERSION=3.11

# Stage 1: install the pinned dependencies, then Stoker itself, into a virtual environment.
FROM python:${PYTHON_VERSION}-slim AS build
ARG ACCELERATOR=cpu
RUN python -m venv /opt/stoker
ENV PATH=/opt/stoker/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this layer is reused until the pins change.
COPY pyproject.toml ./
RUN case "$ACCELERATOR" in \
      cpu) extra= ;; \
      tpu|cuda) extra="$ACCELERATOR" ;; \
      *) echo "ACCELERATOR=$ACCELERATOR is not a variant: use cpu, tpu or cuda." >&2; exit 1 ;; \
    esac \
 && python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extra = sys.argv[1]; print('\n'.join(p['dependencies'] + (p['optional-dependencies'][extra] if extra else [])))" \
      "$extra" > requirements.txt \
 && pip install -r requirements.txt
COPY . .
RUN pip install --no-deps . && stoker --help > /dev/null

# Stage 2: the runtime image: the virtual environment on a clean Python, no build context.
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG ACCELERATOR=cpu
LABEL org.opencontainers.image.title="stoker" \
      org.opencontainers.image.description="JAX/TPU-first LLM training and serving (variant: ${ACCELERATOR})"
COPY --from=build /opt/stoker /opt/stoker
ENV PATH=/opt/stoker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STOKER_ACCELERATOR=${ACCELERATOR} \
    JAX_COMPILATION_CACHE_DIR=/var/cache/stoker/xla
# An unprivileged user (a numeric UID, so that Kubernetes' runAsNonRoot can check it) owns what
# stoker writes: the working directory, the compilation cache and its home (~/.cache/stoker: data,
# `stoker serve`'s log).
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin stoker \
 && mkdir -p /work /var/cache/stoker \
 && chown stoker:stoker /work /var/cache/stoker
WORKDIR /work
# 8000: `stoker serve`; 9431: the training Prometheus exporter; 8482: the jax.distributed coordinator.
EXPOSE 8000 9431 8482
USER 10001:10001
ENTRYPOINT ["stoker"]
CMD ["--help"]
