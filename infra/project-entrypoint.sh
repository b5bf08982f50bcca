#!/bin/sh
# Entry point of the pipeline image: run the command in $KDQ_PROJECT_DIR.
#
# With KDQ_SYNC_SOURCES=1 (the Kubernetes Prefect worker), that folder is a shared volume: the image's sources are
# synced into it (outputs left alone) and committed, so it is a git + DVC checkout where the pipeline's outputs,
# dvc.lock, the DVC cache and the sweeps' work_dir live. Every worker then sees what upstream stages wrote, results
# outlive a pod restart, and DVC re-runs what a new image changed. The sync happens only when the image's commit
# differs from the one last synced, so a restarting pod never rewrites the sources under a running pipeline.
# KDQ_DVC_ENDPOINT_URL (with it) points the checkout's DVC remote `storage` at the cluster's S3 endpoint.
# Without it (Dask workers, which read the volume the worker prepared; compose, which bind-mounts the host's
# checkout) the folder is used as it is.
set -eu
dest="${KDQ_PROJECT_DIR:?set KDQ_PROJECT_DIR to the project folder}"
mkdir -p "$dest"
if [ "${KDQ_SYNC_SOURCES:-0}" = 1 ]; then
  # one pod at a time: several may start together on the same volume
  flock "$dest/.kdq-sync.lock" sh -eu -c '
    src=$1; cd "$2"
    rev=$(git -C "$src" rev-parse HEAD)
    [ "$(cat .kdq-image-rev 2>/dev/null || true)" = "$rev" ] && exit 0   # these sources are in place already
    set -- tasks flows dvc.yaml params.yaml prefect.yaml pyproject.toml constraints.txt .dvcignore .gitignore .dvc/config
    for item in "$@"; do
      rm -rf "./$item"; mkdir -p "$(dirname "./$item")"; cp -a "$src/$item" "./$item"
    done
    [ -d .git ] || { git init -q && printf "%s\n" .kdq-sync.lock .kdq-image-rev >> .git/info/exclude; }
    git add -A -- "$@"
    git diff --cached --quiet || git -c user.name=kdq-image -c user.email=kdq-image@localhost commit -qm "pipeline image sources $rev"
    printf "%s\n" "$rev" > .kdq-image-rev
  ' sync "${KDQ_IMAGE_SOURCES:-/opt/kdq-src}" "$dest"
  # the DVC remote `storage` as the pods reach it (.dvc/config names the host's MinIO, localhost:9000), in the
  # checkout's local DVC config, which git leaves out
  if [ -n "${KDQ_DVC_ENDPOINT_URL:-}" ]; then
    (cd "$dest" && flock .kdq-sync.lock sh -eu -c '
      dvc remote modify --local storage endpointurl "$1"
      grep -qxF .dvc/config.local .git/info/exclude || printf "%s\n" .dvc/config.local >> .git/info/exclude
    ' endpoint "$KDQ_DVC_ENDPOINT_URL")
  fi
fi
cd "$dest"
exec "$@"
