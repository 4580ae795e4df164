# PostgreSQL 15 with pgTAP and pg_cron, for the `postgres` service in
# docker-compose.yml (a development database and a pgTAP target).
FROM postgres:15-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15-pgtap postgresql-15-cron \
 && rm -rf /var/lib/apt/lists/*
