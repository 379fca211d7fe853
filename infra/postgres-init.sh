#!/bin/sh
# One PostgreSQL server, two databases: `prefect` (Prefect server) and `mlflow` (MLflow backend store), each
# owned by its own login role so that neither service can touch the other's tables.
#
# The postgres image runs this once, on an empty data volume (/docker-entrypoint-initdb.d); the test suite
# (tests/infra/test_production_stack.py) runs the same file against its own server over TCP (PGHOST/PGPORT).
# Passwords come from the environment (infra/.env), never from this file; psql quotes them (:'var').
set -eu
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
     -v prefect_pw="$PREFECT_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
