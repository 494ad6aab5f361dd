# One image runs any fnplane component by argument (deploy/ passes it):
#   docker build -t fnplane:0.1.0 .
#   docker run fnplane:0.1.0 activator     # or coordinator, scale, schedule, route, node, operator
# The same image is the default image of service pods: `python -m examples.sample.server`
# (the sample model) runs in it, as does any server a spec's command names that it contains.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernel kernel
COPY controlplane controlplane
COPY functions functions
COPY partitions partitions
COPY activator activator
COPY loadtests loadtests
COPY examples examples
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# Non-root, numeric (runAsNonRoot can check it), and nothing written outside /tmp, which
# the Deployments mount as an emptyDir under a read-only root filesystem.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin fnplane
USER 10001:10001
WORKDIR /tmp
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["python", "-m", "controlplane.component"]
CMD ["coordinator"]
