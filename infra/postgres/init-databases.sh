#!/bin/sh
# One PostgreSQL server, three databases: MLflow's runs and registry, MLflow's users, Prefect's state.
set -eu
for db in mlflow mlflow_auth prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE $db"
done
