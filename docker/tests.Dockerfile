# Python 3.11 on Debian bookworm with the PostgreSQL 15 server binaries,
# pgTAP, pg_prove and pg_cron: what scripts/test needs, pre-installed.
FROM python:3.11-slim-bookworm
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The suite starts its own clusters: no 'main' cluster from the package.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/00-bulk-sync-tests.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        postgresql-15 postgresql-15-pgtap postgresql-15-cron \
        libtap-parser-sourcehandler-pgtap-perl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN python3 -m pip install --quiet --editable '.[test]'
CMD ["bash", "docker/run-tests.sh"]
