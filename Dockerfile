# portway in a container: non-root, config at /etc/portway/portway.yml.
#   docker build -t portway .
#   docker run --rm -p 2222:2222 -v $PWD/portway.yml:/etc/portway/portway.yml:ro portway
# Docker providers (routes from container labels) need the socket, which is optional:
#   -v /var/run/docker.sock:/var/run/docker.sock:ro  (and --group-add of the socket's group)
FROM python:3.11-slim AS build
# gcc builds the compiled core (src/portway/stream/_fastpath.c) into the wheel; the runtime
# image needs no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin portway \
    && mkdir -p /etc/portway && chown root:portway /etc/portway && chmod 0750 /etc/portway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER portway
# The admin listener (metrics, status page) if the config enables it on 0.0.0.0:9108.
EXPOSE 9108
STOPSIGNAL SIGTERM
ENTRYPOINT ["portway"]
CMD ["serve", "-c", "/etc/portway/portway.yml", "--log-format", "json"]
