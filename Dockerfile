# feedstack serving image: ONNX Runtime, FAISS, BentoML, MLflow client; no torch, no training code.
#
#   docker build -t feedstack-serve .
#   docker run -p 3000:3000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 -e FEEDSTACK_ADMIN_TOKEN=... feedstack-serve
#
# By default it serves the registry's production bundle (models:/feedstack@production); a mounted bundle
# directory works too:  -v $PWD/runs/kuairand/bundle:/bundle:ro -e FEEDSTACK_BUNDLE=/bundle
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=true \
    BENTOML_HOME=/home/feedstack/bentoml \
    FEEDSTACK_BUNDLE=models:/feedstack@production \
    FEEDSTACK_STATE_DIR=/home/feedstack/state

# libgomp: the OpenMP runtime FAISS and ONNX Runtime use for their CPU kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 feedstack

WORKDIR /app
# Dependencies first (cached while only code changes): the same pins as development, serve extra only.
COPY pyproject.toml constraints.txt README.md ./
COPY features ./features
COPY serving ./serving
# pip compiles bytecode by default (imports ~3x faster than from source; keep it, no --no-compile).
RUN pip install -c constraints.txt ".[serve]" \
    && python -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('torch') else 0)"

USER feedstack
RUN python -c "import serving.service"
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2).status == 200 else 1)"

# python -m serving starts `bentoml serve serving.service:Feedstack`; SIGTERM is forwarded to it.
CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "3000"]
