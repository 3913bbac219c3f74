#!/bin/bash
# imgbuild inspect: run on the Chroma instance through SSM Run Command. Lists every collection
# of a Chroma data directory with its record count, read through Chroma itself (its own API, not
# its files), as `IMGBUILD_COLLECTION <count> <name>` lines, then the result line imgbuild reads.
#
# With IMGBUILD_CHROMA_URL it asks that server. Otherwise it serves a copy of the data directory
# with a throw-away Chroma of the same version on another loopback port: at backup time the
# consistent copy on the live file system (to record what the recovery point holds), at verify
# time a restored file system mounted read-only at a path of its own. Chroma opens its database
# for writing, so the throw-away server gets a copy on the instance's disk and the source is
# never written; the live Chroma is never stopped or touched.
set -euo pipefail

root="${IMGBUILD_ROOT:-}"
readonly token="${IMGBUILD_TOKEN:?}"
readonly api="${IMGBUILD_API_PREFIX:?}"
readonly heartbeat="${IMGBUILD_HEARTBEAT_PATH:?}"

log() { echo "imgbuild-inspect: $*" >&2; }
fail() {
  log "$*"
  echo "IMGBUILD_RESULT status=failed token=${token}"
  exit 1
}

# Only the default tenant and database: the ones imgbuild's deployments serve.
inventory() {
  local base="$1" coll json offset=0 page=100 id name count
  if [[ "${api}" == "/api/v2" ]]; then
    coll="${base}${api}/tenants/default_tenant/databases/default_database/collections"
  else
    coll="${base}${api}/collections"
  fi
  while :; do
    json=$(curl -fsS --max-time 30 "${coll}?limit=${page}&offset=${offset}") || fail "listing the collections at ${coll} failed"
    local rows=()
    mapfile -t rows < <(python3 -c 'import json, sys
for c in json.load(sys.stdin):
    print(c["id"] + "\t" + c["name"])' <<< "${json}") || fail "Chroma's collection list was not the JSON expected"
    for row in "${rows[@]}"; do
      id="${row%%$'\t'*}" name="${row#*$'\t'}"
      count=$(curl -fsS --max-time 30 "${coll}/${id}/count") || fail "counting collection ${name} failed"
      [[ "${count}" =~ ^[0-9]+$ ]] || fail "collection ${name}: count ${count} is not a number"
      echo "IMGBUILD_COLLECTION ${count} ${name}"
    done
    ((${#rows[@]} < page)) && break
    offset=$((offset + page))
  done
}

if [[ -n "${IMGBUILD_CHROMA_URL:-}" ]]; then
  inventory "${IMGBUILD_CHROMA_URL}"
  echo "IMGBUILD_RESULT status=ok token=${token}"
  exit 0
fi

readonly source_root="${root}${IMGBUILD_SOURCE_ROOT:?}"
readonly source_dir="${source_root}/${IMGBUILD_SOURCE_PATH:?}"
readonly port="${IMGBUILD_INSPECT_PORT:?}"
readonly work="${root}/var/tmp/imgbuild-inspect-${token}"
readonly container="imgbuild-inspect-${token}"
mounted=0
cleanup() {
  docker rm -f "${container}" > /dev/null 2>&1 || true
  rm -rf "${work}"
  if [[ ${mounted} -eq 1 ]]; then umount "${source_root}" || log "unmounting ${source_root} failed"; fi
}
trap cleanup EXIT

if [[ -n "${IMGBUILD_MOUNT_ARGS:-}" ]]; then
  install -d -m 0700 "${source_root}"
  read -ra mount_args <<< "${IMGBUILD_MOUNT_ARGS}"
  timeout 120 mount "${mount_args[@]}" -o ro "${source_root}" || fail "mounting ${source_root} read-only failed"
  mounted=1
  mountpoint -q "${source_root}" || fail "${source_root} is not mounted"
fi
[[ -d "${source_dir}" ]] || fail "${source_dir} does not exist: no Chroma data to inspect"

install -d -m 0700 "${work}"
cp -a "${source_dir}" "${work}/data"
env_args=()
for kv in ${IMGBUILD_CHROMA_ENV:-}; do env_args+=(-e "${kv}"); done
docker run -d --name "${container}" -p "127.0.0.1:${port}:${IMGBUILD_CONTAINER_PORT:?}" \
  -v "${work}/data:${IMGBUILD_CONTAINER_DATA:?}" "${env_args[@]}" "${IMGBUILD_IMAGE:?}" > /dev/null \
  || fail "starting the throw-away Chroma failed"
for _ in $(seq 1 60); do
  curl -fsS --max-time 5 "http://127.0.0.1:${port}${heartbeat}" > /dev/null 2>&1 && break
  sleep 2
done
curl -fsS --max-time 5 "http://127.0.0.1:${port}${heartbeat}" > /dev/null || fail "the throw-away Chroma did not answer on port ${port} within 120s"
inventory "http://127.0.0.1:${port}"
echo "IMGBUILD_RESULT status=ok token=${token}"
