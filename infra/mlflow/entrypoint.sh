#!/bin/sh
# Writes the basic-auth config from the environment (the auth app reads its user database only from this file),
# then serves MLflow: runs and registry in PostgreSQL, artifacts proxied to S3, every request authenticated.
# A checked credential is cached for MLFLOW_AUTH_CACHE_TTL_SECONDS (MLflow's default, 0, hashes the password with
# PBKDF2 on every request: stages logging system metrics every few seconds kept the server's workers busy; a changed
# password or removed user is refused by every worker within the TTL; 0 turns the cache off).
# The database user and password are percent-encoded into the URL (a password with @, : or / is still one URL's
# credentials), read from the environment, never put on a command line (ps shows those to every user).
set -eu
: "${POSTGRES_USER:?is not set}" "${POSTGRES_PASSWORD:?is not set}"
DB=$(python3 - <<'PY'
import os
from urllib.parse import quote

user, password = (quote(os.environ[name], safe="") for name in ("POSTGRES_USER", "POSTGRES_PASSWORD"))
print(f"postgresql+psycopg2://{user}:{password}@{os.environ.get('POSTGRES_HOST') or 'postgres'}:5432")
PY
)
umask 077
# MLflow's reader of this file interpolates %: a percent-encoded character is written %%
cat > /tmp/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = $(printf '%s' "${DB}" | sed 's/%/%%/g')/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
INI
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_ADMIN_PASSWORD}"
# MLflow's job runner (huey consumer processes) serves GenAI features this stack does not use
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_BACKEND_STORE_URI="${DB}/mlflow"   # --backend-store-uri's own variable: the password off the argv
exec mlflow server --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-2}" \
  --artifacts-destination "s3://mlflow/artifacts" \
  --app-name basic-auth --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost:5000,127.0.0.1:5000,mlflow:5000}"
