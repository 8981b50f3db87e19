# Local stand-ins for the public images the compose stack pulls (redis, prom/prometheus), for a
# machine that reaches Debian's mirrors but no container registry: `make deploy-check` builds
#   --target redis      -> kvc-standin/redis:bookworm       (Debian's redis-server 7.0)
#   --target prometheus -> kvc-standin/prometheus:bookworm  (Debian's prometheus 2.42, with wget for
#                                                            the compose health check)
# on the same debootstrap base as the kvcluster image. Never part of a deployment.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS redis
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
USER redis
CMD ["redis-server", "--save", "", "--appendonly", "no"]

FROM ${BASE_IMAGE} AS prometheus
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown prometheus /prometheus
USER prometheus
ENTRYPOINT ["prometheus"]
